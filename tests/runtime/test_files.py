"""runtime/files.py: every file is written completely or not at all."""
from __future__ import annotations

import errno

import pytest
import timm
import torch

from pipeline.errors import OutputError
from pipeline.model import checkpoint
from pipeline.runtime import files


def test_disk_full_between_write_and_rename_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    model = timm.create_model("test_efficientnet", num_classes=3)
    meta = {"arch": "test_efficientnet", "num_classes": 3, "class_names": ["a", "b", "c"], "epoch": 1,
            "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                              "interpolation": "bicubic", "crop_pct": 0.875}}
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
    with files.staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing visible until the block succeeds
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), files.staged_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("half-way")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the earlier version is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging dir left behind


def test_concurrent_writers_use_their_own_temp_files(tmp_path):
    """Threads writing the same path never share a temp file (the feature cache and DiskCache rely on it)."""
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "same.json"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: files.write_json(target, {"writer": i, "pad": "x" * 100_000}), range(16)))
    assert files.json.loads(target.read_text())["pad"] == "x" * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["same.json"]
