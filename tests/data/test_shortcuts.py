"""Shortcut check: storage metadata that predicts the label is flagged; real photos stored alike are not."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import HYMENOPTERA, compose_cfg
from pipeline.data.data_audit import audit_dataset
from pipeline.data.folder import SplitLayout, load_imagefolder
from pipeline.data.images import check_decodable_image
from pipeline.reports.audit_report import audit_markdown


def write_photo(path: Path, seed: int, mode: str) -> None:
    """The same random content distribution for every class (a grey gradient with noise), stored in `mode`."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 48)[None, :] * rng.uniform(60, 200) + rng.normal(0, 20, (48, 48))
    grey = np.clip(ramp + rng.uniform(0, 50), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey).convert(mode).save(path, format="JPEG", quality=90)


def test_colour_mode_that_gives_the_label_away_is_flagged(tmp_path):
    root = tmp_path / "xray"
    for i in range(24):
        write_photo(root / "train/NORMAL" / f"n{i}.jpg", seed=i, mode="L")  # one class saved as greyscale JPEG
        write_photo(root / "train/PNEUMONIA" / f"p{i}.jpg", seed=100 + i, mode="RGB")  # the other as RGB JPEG
    data = load_imagefolder(root, SplitLayout(val_fraction=0.25))
    report = audit_dataset(data, root=root, checks=compose_cfg().audit, seed=0)
    found = report["shortcuts"]
    assert found["flagged"] and found["classifier"]["balanced_accuracy"] >= 0.9 and found["classifier"]["chance"] == 0.5
    assert found["per_class"]["colour mode"] == {"NORMAL": {"L": 1.0}, "PNEUMONIA": {"RGB": 1.0}}
    assert found["separation"]["colour mode"] == 1.0 and found["separation"]["format"] == 0.0
    warning = next(w for w in report["warnings"] if w.startswith("SHORTCUT"))
    assert "CV balanced accuracy 1.00 vs chance 0.50" in warning
    assert "colour mode: NORMAL 100% L, PNEUMONIA 100% RGB" in warning
    assert report["summary"]["shortcut_flagged"] is True
    text = "\n".join(audit_markdown(report))
    assert "### Storage shortcuts" in text and "| NORMAL | 100% L |" in text
    strict = audit_dataset(data, root=root, checks=compose_cfg(["audit.shortcut_threshold=1.0"]).audit, seed=0)
    assert strict["shortcuts"]["flagged"] is (strict["shortcuts"]["classifier"]["skill"] >= 1.0)


def test_same_storage_for_every_class_is_not_flagged(tmp_path):
    root = tmp_path / "alike"
    for i in range(12):
        write_photo(root / "train/a" / f"a{i}.jpg", seed=i, mode="RGB")
        write_photo(root / "train/b" / f"b{i}.jpg", seed=50 + i, mode="RGB")
    report = audit_dataset(load_imagefolder(root), root=root, checks=compose_cfg().audit, seed=0)
    assert not report["shortcuts"]["flagged"] and report["shortcuts"]["classifier"]["constant"]
    assert not any(w.startswith("SHORTCUT") for w in report["warnings"])


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="shared dataset hymenoptera not present")
def test_hymenoptera_is_not_flagged():
    data = load_imagefolder(HYMENOPTERA, workers=2)
    found = audit_dataset(data, root=HYMENOPTERA, checks=compose_cfg().audit, seed=0)["shortcuts"]
    assert not found["flagged"] and found["classifier"]["skill"] < 0.3 and not found["classifier"]["constant"]


def test_probe_records_storage_facts(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "q60.jpg", format="JPEG", quality=60, subsampling="4:2:0")
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    Image.fromarray(rgb).save(tmp_path / "q95.jpg", format="JPEG", quality=95, subsampling="4:4:4", exif=exif)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.jpg", format="JPEG", quality=75)
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    r = {p.stem: check_decodable_image(str(p)) for p in tmp_path.iterdir()}
    assert (r["q60"]["quality"], r["q60"]["subsampling"], r["q60"]["exif"]) == (60, "4:2:0", False)
    assert (r["q95"]["quality"], r["q95"]["subsampling"], r["q95"]["exif"]) == (95, "4:4:4", True)
    assert (r["grey"]["quality"], r["grey"]["subsampling"], r["grey"]["mode"]) == (75, "none", "L")
    assert (r["plain"]["quality"], r["plain"]["subsampling"]) == (None, None) and len(r["plain"]["phash"]) == 64
