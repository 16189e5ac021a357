"""runtime/files.py: every file is written completely or not at all."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import timm
import torch

from pipeline.errors import OutputError
from pipeline.model import checkpoint
from pipeline.runtime import files, owned


def tiny_model_and_meta() -> tuple[torch.nn.Module, dict]:
    model = timm.create_model("test_efficientnet", num_classes=3)
    return model, {"arch": "test_efficientnet", "num_classes": 3, "class_names": ["a", "b", "c"], "epoch": 1,
                   "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                     "interpolation": "bicubic", "crop_pct": 0.875}}


def test_disk_full_between_write_and_rename_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    model, meta = tiny_model_and_meta()
    checkpoint.save_checkpoint(tmp_path, "best", model, meta)
    checkpoint.save_state(tmp_path, {"epoch": 1, "model": model.state_dict()})
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(files.FileWriteError, match=r"best.safetensors \(No space left on device\); the "
                                                             r"previous version is intact; the disk is full"):
        checkpoint.save_checkpoint(tmp_path, "best", model, {**meta, "epoch": 2})
    with pytest.raises(OutputError, match="last.pt .*previous version is intact"):
        checkpoint.save_state(tmp_path, {"epoch": 2, "model": model.state_dict()})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors", "last.pt"]  # no temp file
    best, saved_meta = checkpoint.load_checkpoint(tmp_path, "best")
    state = checkpoint.load_state(tmp_path / "last.pt")
    assert saved_meta["epoch"] == 1 and state["epoch"] == 1
    assert all(torch.equal(best.state_dict()[k], old[k]) and torch.equal(state["model"][k], old[k]) for k in old)


def test_staged_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    with files.staged_dir(out, kind="export", fix="choose another out=") as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing visible until the block succeeds
    assert (out / "a.txt").read_text() == "1" and owned.owner(out) == "export"
    with pytest.raises(RuntimeError), files.staged_dir(out, kind="export", fix="choose another out=") as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("half-way")
    assert sorted(p.name for p in out.iterdir()) == [owned.MARK, "a.txt"]  # the earlier version is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging dir left behind


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_staged_dir_keeps_the_old_dir_until_the_new_one_is_in_place(tmp_path, monkeypatch, exchange):
    out = tmp_path / "export"
    with files.staged_dir(out, kind="export", fix="-") as tmp:
        (tmp / "v").write_text("1")
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    with files.staged_dir(out, kind="export", fix="-") as tmp:
        (tmp / "v").write_text("2")
        assert (out / "v").read_text() == "1"  # the old dir stays whole while the new one is written
    assert (out / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the old one gone only after the swap


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_failed_swap_leaves_the_old_dir_whole(tmp_path, monkeypatch, exchange):
    out = tmp_path / "export"
    with files.staged_dir(out, kind="export", fix="-") as tmp:
        (tmp / "v").write_text("1")
    real_rename = os.rename

    def failing_rename(src, dst):  # the new dir cannot be put in place (e.g. the disk went away)
        if ".partial" in str(src) and str(dst) == str(out):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(files, "_exchange", lambda a, b: False if not exchange else (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    monkeypatch.setattr(files.os, "rename", failing_rename)
    with pytest.raises((files.FileWriteError, OSError)):
        with files.staged_dir(out, kind="export", fix="-") as tmp:
            (tmp / "v").write_text("2")
    monkeypatch.undo()
    assert (out / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize("kind", ["export", "dataset"])
def test_staged_dir_never_replaces_a_dir_the_pipeline_did_not_mark(tmp_path, kind):
    user = tmp_path / "photos"
    (user / "cats").mkdir(parents=True)
    (user / "cats" / "my_photo.jpg").write_bytes(b"\xff\xd8\xffmine")
    with pytest.raises(OutputError, match=r"photos holds files the pipeline did not write \(e.g. cats\) and would be replaced: use x"):
        with files.staged_dir(user, kind=kind, fix="use x"):
            pass
    assert (user / "cats" / "my_photo.jpg").read_bytes() == b"\xff\xd8\xffmine"
    other = tmp_path / "other"  # marked, but as another kind: not replaceable either
    other.mkdir()
    (other / "f").write_text("x")
    owned.mark(other, "run")
    with pytest.raises(OutputError), files.staged_dir(other, kind="export", fix="-"):
        pass


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temps_of_dead_processes_are_cleaned_and_live_ones_kept(tmp_path):
    dead, host = _dead_pid(), files._HOST
    stale_file = tmp_path / f".best.safetensors.{host}.{dead}.1.tmp"
    stale_dir = tmp_path / f".export.{host}.{dead}.1.partial"
    mine = tmp_path / f".x.json.{host}.{os.getpid()}.1.tmp"
    other_host = tmp_path / f".y.json.elsewhere.{dead}.1.tmp"
    moved_away = tmp_path / f".digits.{host}.{dead}.1.old"  # killed between the two renames of a replace
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "f").write_text("x")
    for p in (mine, other_host):
        p.write_text("x")
    moved_away.mkdir()
    (moved_away / "kept").write_text("old tree")
    removed = files.clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale_file.name, stale_dir.name])
    assert mine.exists() and other_host.exists()
    assert (tmp_path / "digits" / "kept").read_text() == "old tree"  # put back, not deleted


@pytest.mark.parametrize("error", [RuntimeError("safetensors: No space left on device (os error 28)"),
                                   KeyboardInterrupt()], ids=["runtime-error", "ctrl-c"])
def test_a_failed_write_leaves_no_temp_file_and_one_error(tmp_path, error):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"previous")

    def write(p):
        p.write_bytes(b"partial")
        raise error

    expected = files.FileWriteError if isinstance(error, Exception) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        files.write_atomic(target, write)
    if expected is files.FileWriteError:
        assert "previous version is intact; the disk is full" in str(info.value)
        assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"] and target.read_bytes() == b"previous"


def test_best_is_one_generation_even_when_killed_between_weights_and_json(tmp_path, monkeypatch):
    model, meta = tiny_model_and_meta()
    checkpoint.save_checkpoint(tmp_path, "best", model, meta)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def killed(path, obj):
        raise KeyboardInterrupt  # the process dies after the weights' commit, before the JSON copy

    monkeypatch.setattr(checkpoint, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, "best", model, {**meta, "epoch": 2})
    monkeypatch.undo()
    assert files.json.loads((tmp_path / "best.json").read_text())["epoch"] == 1  # the copy is one behind
    loaded, loaded_meta = checkpoint.load_checkpoint(tmp_path, "best")
    assert loaded_meta["epoch"] == 2  # the JSON committed with the weights wins, and the copy is rewritten
    assert files.json.loads((tmp_path / "best.json").read_text())["epoch"] == 2
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_concurrent_writers_use_their_own_temp_files(tmp_path):
    """Threads writing the same path never share a temp file (the feature cache and DiskCache rely on it)."""
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "same.json"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: files.write_json(target, {"writer": i, "pad": "x" * 100_000}), range(16)))
    assert files.json.loads(target.read_text())["pad"] == "x" * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["same.json"]
