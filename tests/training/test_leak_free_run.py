"""A run on real photos whose val split holds copies of train files: epoch selection and the headline metrics use
the leak-free val files, the full numbers count the copies, and split.csv keeps every file (data/leaks.py)."""
from __future__ import annotations

import csv
import json
import shutil

from PIL import Image

from conftest import HYMENOPTERA
from pipeline.ship.saving import export_run
from pipeline.train import train

EXACT, NEAR, TEST_COPIES = 3, 2, 2  # copies per class


def _leaky_folder(root):
    for c in ("ants", "bees"):
        train_files = sorted((HYMENOPTERA / "train" / c).glob("*.jpg"))[:16]
        for split, files in (("train", train_files), ("val", sorted((HYMENOPTERA / "val" / c).glob("*.jpg"))[:12])):
            (root / split / c).mkdir(parents=True)
            for p in files:
                shutil.copy(p, root / split / c / p.name)
        for p in train_files[:EXACT]:
            shutil.copy(p, root / "val" / c / f"copy_{p.name}")
        for p in train_files[EXACT:EXACT + NEAR]:  # a half-size JPEG-60 re-save: other bytes, same picture
            with Image.open(p) as im:
                im.convert("RGB").resize((im.width // 2, im.height // 2)).save(root / "val" / c / f"near_{p.name}",
                                                                               quality=60)
        (root / "test" / c).mkdir(parents=True)
        for p in sorted((HYMENOPTERA / "val" / c).glob("*.jpg"))[12:18] + train_files[-TEST_COPIES:]:
            shutil.copy(p, root / "test" / c / f"t_{p.name}")
    return root


def test_leaked_val_files_are_scored_apart(cfg_factory, tmp_path):
    data = _leaky_folder(tmp_path / "leaky")
    cfg = cfg_factory("dataset=folder", f"dataset.root={data}", "backbone=tiny", "backbone.input_size=64",
                      "strategy=finetune", "trainer.epochs=2", "trainer.max_train_batches=0")
    metrics = train(cfg)
    run = tmp_path / "run"
    leaked, clean = 2 * (EXACT + NEAR), 2 * 12
    assert metrics["leaks"]["val"] == {"leaked": leaked, "leak_free": clean, "set_aside": True}
    assert (metrics["leaks"]["exact"], metrics["leaks"]["near"]) == (2 * (EXACT + TEST_COPIES), 2 * NEAR)
    assert metrics["val"]["num_samples"] == clean  # the headline
    assert metrics["val_with_leaks"]["num_samples"] == clean + leaked
    assert all(h["val_num_samples"] == clean for h in metrics["history"])  # each epoch judged on leak-free val
    best = json.loads((run / "best.json").read_text())
    assert best["val_metrics"]["num_samples"] == clean
    with open(run / "split.csv", newline="") as f:
        assert sum(row["split"] == "val" for row in csv.DictReader(f)) == clean + leaked
    assert metrics["test"]["num_samples"] == 2 * 6 and metrics["test_with_leaks"]["num_samples"] == 2 * 8
    summary = (run / "summary.md").read_text()
    order = ("| val (leak-free) |", "| test (leak-free) |", f"| val with its {leaked} leaked files |",
             f"| test with its {2 * TEST_COPIES} leaked files |")
    rows = [summary.index(row) for row in order]
    assert rows == sorted(rows)  # the leak-free numbers first
    assert "storage invariance (" in summary and "storage_invariance" in metrics

    doc = json.loads((export_run(run, tmp_path / "export", formats=["safetensors"]) / "model.json").read_text())
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert doc["leaks"] == metrics["leaks"] and doc["metrics"]["test"]["num_samples"] == 2 * 6
    assert card.index("| test (leak-free) |") < card.index(f"| test with its {2 * TEST_COPIES} leaked files |")
    assert f"{leaked} val and {2 * TEST_COPIES} test files copy a training" in card
    assert "- Storage: re-encoding 24 val images" in card
