"""data/leaks.py: val/test copies of earlier files are set aside, not lost."""
from __future__ import annotations

from pipeline.data.folder import DatasetSplits, Split
from pipeline.data.leaks import set_aside

CLASSES = ["a", "b"]


def _splits() -> DatasetSplits:
    train = Split([f"t{i}" for i in range(6)], [0, 0, 0, 1, 1, 1], CLASSES)
    val = Split(["v0", "v1", "v2", "v3"], [0, 0, 1, 1], CLASSES)
    test = Split(["s0", "s1", "s2"], [0, 1, 1], CLASSES)
    files = {p: {"sha1": p} for s in (train, val, test) for p in s.paths}
    files["v0"]["sha1"] = "t0"  # byte-identical to a train file
    files["s2"]["sha1"] = "v3"  # test copies a val file
    return DatasetSplits(CLASSES, train, val, test, files=files)


def _report(near: list[tuple[str, str]]) -> dict:
    return {"near_duplicates": {"pairs": [{"files": [{"path": a}, {"path": b}]} for a, b in near]}}


def test_exact_and_near_copies_leave_val_and_test_and_wait_in_leaked():
    data, record = set_aside(_splits(), _report([("t4", "v2")]))
    assert data.val.paths == ["v1", "v3"] and data.val.labels == [0, 1]
    assert data.test.paths == ["s0", "s1"]
    assert data.leaked["val"].paths == ["v0", "v2"] and data.leaked["val"].labels == [0, 1]
    assert data.leaked["test"].paths == ["s2"]
    assert record["val"] == {"leaked": 2, "leak_free": 2, "set_aside": True}
    assert record["test"]["leaked"] == 1 and (record["exact"], record["near"]) == (2, 1)
    assert sorted(p for p, _, _ in data.rows()) == sorted(p for p, _, _ in _splits().rows())  # split.csv keeps all


def test_no_leak_changes_nothing():
    data = _splits()
    data.files["v0"]["sha1"], data.files["s2"]["sha1"] = "v0", "s2"
    kept, record = set_aside(data, _report([]))
    assert kept is data and record == {}


def test_a_split_that_is_all_copies_keeps_them():
    data = _splits()
    for p, t in zip(data.val.paths, data.train.paths):
        data.files[p]["sha1"] = t
    kept, record = set_aside(data, _report([]))
    assert kept.val.paths == data.val.paths and "val" not in kept.leaked
    assert record["val"]["set_aside"] is False
