"""Error gallery: top_losses_<split>.png/.csv show the highest-loss images, mapped to the right files;
top_losses_<split>_cam.png overlays the Grad-CAM of the best checkpoint on them."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
from conftest import CLASSES, make_imagefolder, write_image, write_tiny_folder
from pipeline.data.folder import DatasetSplits, Split
from pipeline.reports import gallery
from pipeline.reports.preview_grid import grid_size
from pipeline.train import train


def _read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("strategy", ["finetune", "linear_probe"])
def test_top_losses_are_the_highest_loss_images_on_both_paths(tmp_path, cfg_factory, strategy):
    data = write_tiny_folder(tmp_path / "tiny")
    make_imagefolder(data, {c: 2 for c in CLASSES}, "test", offset=900)
    cfg = cfg_factory("dataset=folder", f"dataset.root={data}", "backbone=tiny", "backbone.input_size=64",
                      f"strategy={strategy}", "trainer.epochs=3", "trainer.max_train_batches=0", "optim.lr=0.05",
                      "trainer.top_losses=5")
    run = Path(train(cfg)["run_dir"])
    model = pipeline.load(run)  # the best checkpoint, scored here image by image
    for split, n_files in (("val", 12), ("test", 6)):
        paths = sorted(str(p) for p in (data / split).rglob("*.png"))
        labels = torch.tensor([CLASSES.index(Path(p).parent.name) for p in paths])
        logits = model.logits(torch.stack([model.preprocess(p) for p in paths]))
        loss = dict(zip(paths, torch.nn.functional.cross_entropy(logits, labels, reduction="none").tolist()))
        rows = _read(run / f"top_losses_{split}.csv")
        assert len(rows) == 5 and len(loss) == n_files
        shown = [float(r["loss"]) for r in rows]
        assert shown == sorted(shown, reverse=True)
        for r in rows:
            assert float(r["loss"]) == pytest.approx(loss[r["path"]], abs=1e-4)
            assert r["true"] == Path(r["path"]).parent.name
        assert max(v for p, v in loss.items() if p not in {r["path"] for r in rows}) <= min(shown) + 1e-4
        with Image.open(run / f"top_losses_{split}.png") as sheet, \
                Image.open(run / f"top_losses_{split}_cam.png") as cams:
            assert sheet.size == cams.size == grid_size(5, gallery.TILE)
            plain, heat = np.asarray(sheet.convert("RGB"), np.int16), np.asarray(cams.convert("RGB"), np.int16)
        assert np.abs(plain - heat).mean() > 10  # the heat maps are drawn over the images


def test_rows_skip_the_files_that_failed_to_decode(tmp_path):
    classes = ["a", "b"]
    paths = [str(write_image(tmp_path / f"{i}.png", (40 * i, 90, 20), seed=i)) for i in range(5)]
    split = Split(paths=paths, labels=[0, 1, 1, 0, 1], classes=classes)
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 4.0], [0.0, 1.0]])  # rows of files 0, 1, 3, 4 (2 skipped)
    labels = np.array([0, 1, 0, 1])
    assert np.allclose(gallery.per_image_loss(logits, labels), torch.nn.functional.cross_entropy(
        torch.tensor(logits), torch.tensor(labels), reduction="none").numpy())
    splits = DatasetSplits(classes=classes, train=split, val=split)
    gallery.write_galleries(tmp_path, {"val": (logits, labels)}, splits, n=2, skipped=[{"path": paths[2]}])
    rows = _read(tmp_path / "top_losses_val.csv")
    assert [r["path"] for r in rows] == [paths[3], paths[4]]  # file 3: label a, predicted b with p=0.98
    assert rows[0]["predicted"] == "b" and rows[0]["true"] == "a"
    (tmp_path / "top_losses_val.csv").unlink()
    gallery.write_galleries(tmp_path, {"val": (logits, labels)}, splits, n=2, skipped=[])  # 5 files, 4 rows
    assert not (tmp_path / "top_losses_val.csv").exists()
