"""A feature cache that cannot be written (disk full, unwritable dir) warns once; the run keeps its features."""
from __future__ import annotations

import errno
import logging
from pathlib import Path

import timm
import torch

from pipeline.data.augment import build_eval_transform
from pipeline.data.folder import Split, list_split
from pipeline.features import cache

PREP = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
        "crop_pct": 0.875}


def extract(model, root: Path, cache_dir: Path) -> dict:
    classes = ["blue", "green", "red"]
    paths, labels, _ = list_split(root / "train", classes)
    return cache.load_or_extract(model, Split(paths, labels, classes), build_eval_transform(PREP),
                                 cache.Extraction(torch.device("cpu"), cache_dir, batch_size=16),
                                 key_parts={"arch": "test_efficientnet"})


def test_feature_cache_on_a_full_disk_warns_and_returns_the_features(tiny_folder, tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()

    def disk_full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "save_file", disk_full)
    with caplog.at_level(logging.WARNING, logger="pipeline.features.cache"):
        first = extract(model, tiny_folder, tmp_path / "features")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Feature cache" in warnings[0] and "No space left on device" in warnings[0]
    assert first["features"].shape[0] == 36 and not first["hit"]
    assert not list((tmp_path / "features").glob("*.safetensors"))
    monkeypatch.undo()
    again = extract(model, tiny_folder, tmp_path / "features")  # nothing was stored: extracted again, now cached
    assert not again["hit"] and torch.allclose(again["features"], first["features"])
    assert extract(model, tiny_folder, tmp_path / "features")["hit"]
