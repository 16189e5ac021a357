"""Shortcut check: storage metadata that predicts the label is flagged; real photos stored alike are not; a storage
confound between two classes of many is a CONFOUND warning even when the metadata classifier misses it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import HYMENOPTERA, SHARED_DATASETS, compose_cfg
from pipeline.data.data_audit import audit_dataset, run_audit
from pipeline.data.folder import SplitLayout, load_imagefolder
from pipeline.data.images import check_decodable_image
from pipeline.data.shortcuts import confound_warnings, find_confounds, find_shortcuts, shortcut_markdown
from pipeline.reports.audit_report import audit_markdown

FLOWERS = SHARED_DATASETS / "flowers"


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
    report = audit_dataset(data, root=HYMENOPTERA, checks=compose_cfg().audit, seed=0)
    found = report["shortcuts"]
    assert not found["flagged"] and found["classifier"]["skill"] < 0.3 and not found["classifier"]["constant"]
    assert found["pairs"]["found"] == [] and not any(w.startswith("CONFOUND") for w in report["warnings"])
    assert 0 < max(v["separation"] for v in found["pairs"]["largest"].values()) < 0.2  # measured 0.09 (JPEG quality)


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


def record(mode: str = "RGB", side: int = 224, quality: int | None = 90, width: int | None = None) -> dict:
    """A probe record (data/images.py) of a JPEG stored in `mode` (RGB: 4:2:0), `side` px high."""
    return {"mode": mode, "format": "JPEG" if quality else "PNG", "width": width or side * 4 // 3, "height": side,
            "quality": quality, "subsampling": ("4:2:0" if mode == "RGB" else "none") if quality else None,
            "exif": False}


def greyscale_shares(shares: dict[str, tuple[int, int]]) -> tuple[list[dict], list[int], list[str]]:
    """Records of classes {name: (greyscale files, RGB files)}, alike in everything else."""
    recs, labels = [], []
    for k, (grey, rgb) in enumerate(shares.values()):
        recs += [record("L")] * grey + [record("RGB")] * rgb
        labels += [k] * (grey + rgb)
    return recs, labels, list(shares)


def pair_check(recs, labels, classes, **overrides) -> dict:
    audit = compose_cfg([f"audit.{k}={v}" for k, v in overrides.items()]).audit
    return find_confounds(recs, labels, classes, separation=audit.pair_separation, min_images=audit.pair_min_images)


def test_confound_between_two_of_four_classes_warns_where_the_forest_does_not():
    """The issue's held-back set: one class 99% RGB JPEG 4:2:0, one 88% greyscale JPEG, two mixed."""
    recs, labels, classes = greyscale_shares({"PNEUMONIA": (2, 198), "NORMAL": (176, 24), "VIRAL": (100, 100),
                                              "COVID": (100, 100)})
    audit = compose_cfg().audit
    found = find_shortcuts(recs, labels, classes, threshold=audit.shortcut_threshold, folds=audit.folds, seed=0,
                           pair_separation=audit.pair_separation, pair_min_images=audit.pair_min_images)
    assert not found["flagged"] and found["classifier"]["skill"] < audit.shortcut_threshold  # the forest misses it
    assert [(f["classes"], f["attribute"]) for f in found["pairs"]["found"]] == [
        (["PNEUMONIA", "NORMAL"], "colour mode"), (["PNEUMONIA", "NORMAL"], "chroma subsampling")]
    first = found["pairs"]["found"][0]
    assert (first["separation"], first["images"], first["shares"], first["stored"]) == (
        0.87, [200, 200], [0.99, 0.88], ["RGB", "L"])
    assert found["pairs"]["class_pairs"] == 1 and found["pairs"]["largest"]["colour mode"]["separation"] == 0.87
    [line] = confound_warnings(found)
    assert line.startswith("CONFOUND: colour mode separates PNEUMONIA from NORMAL: PNEUMONIA 99% RGB, NORMAL 88% L "
                           "(separation 0.87, 200 vs 200 images); also chroma subsampling (0.87). A model can learn "
                           "the storage instead of the content: re-encode")
    text = "\n".join(shortcut_markdown(found, 20))
    assert "| PNEUMONIA / NORMAL | colour mode | PNEUMONIA 99% RGB, NORMAL 88% L | 0.87 (" in text


def test_small_classes_and_weak_separation_do_not_warn():
    total = greyscale_shares({"a": (29, 0), "b": (0, 29)})  # stored apart entirely, but < pair_min_images each
    assert pair_check(*total)["found"] == []
    assert len(pair_check(*total, pair_min_images=20)["found"]) == 2  # colour mode and chroma subsampling
    chance = pair_check(*greyscale_shares({"a": (24, 6), "b": (6, 24)}))  # 0.6 at 30 images: within the noise
    largest = chance["largest"]["colour mode"]
    assert chance["found"] == [] and largest["separation"] == 0.6 and largest["lower_bound"] < 0
    more = pair_check(*greyscale_shares({"a": (54, 6), "b": (6, 54)}))  # 0.8 at 60 images: beyond it
    assert [f["attribute"] for f in more["found"]] == ["colour mode", "chroma subsampling"]
    weak = greyscale_shares({"a": (350, 150), "b": (150, 350)})  # 70% vs 30% greyscale: 0.4
    assert pair_check(*weak)["found"] == [] and pair_check(*weak)["largest"]["colour mode"]["separation"] == 0.4
    assert len(pair_check(*weak, pair_separation=0.4)["found"]) == 2


def test_numeric_attributes_are_compared_as_numbers_with_a_tolerance():
    def two(a: dict, b: dict, n: int = 50) -> dict:
        return pair_check([a] * n + [b] * n, [0] * n + [1] * n, ["a", "b"])

    def sides(a: int, b: int) -> dict:
        return two(record(side=a), record(side=b))

    def qualities(a: int | None, b: int) -> dict:
        return two(record(quality=a), record(quality=b))

    across_bin_edge = sides(250, 260)  # 128-255 vs 256-511 px in the table's bins, alike to a model
    assert across_bin_edge["found"] == [] and across_bin_edge["largest"]["short side"]["separation"] == 0
    within_one_bin = sides(260, 500)  # both 256-511 px in the table's bins, stored apart
    [f] = within_one_bin["found"]
    assert (f["attribute"], f["separation"], f["stored"]) == ("short side", 1.0, ["<= 260 px", "> 325 px"])
    assert qualities(90, 93)["found"] == []
    [f] = qualities(95, 70)["found"]
    assert f["attribute"] == "JPEG quality" and f["stored"] == ["> quality 75", "<= quality 70"]
    assert {f["attribute"] for f in qualities(None, 70)["found"]} == {"format", "chroma subsampling"}  # quality: JPEGs


@pytest.mark.skipif(not FLOWERS.is_dir(), reason="shared dataset flowers not present")
def test_real_photos_written_by_two_storage_pipelines_raise_one_confound(tmp_path, caplog):
    """Four flower classes: daisy saved as RGB JPEG 4:2:0, tulips as greyscale JPEG, the others half and half."""
    root = tmp_path / "confound"
    for cls in ("daisy", "roses", "sunflowers", "tulips"):
        for k, src in enumerate(sorted((FLOWERS / "train" / cls).glob("*.jpg"))[:40]):
            mode = {"daisy": "RGB", "tulips": "L"}.get(cls, ("RGB", "L")[k % 2])
            (root / "train" / cls).mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                im.convert(mode).save(root / "train" / cls / f"{k}.jpg", quality=90,
                                      **({"subsampling": "4:2:0"} if mode == "RGB" else {}))
    data = load_imagefolder(root, SplitLayout(val_fraction=0.25), workers=2)
    _, report = run_audit(data, name="confound", root=root, dedup="none", checks=compose_cfg().audit, seed=0)
    confounds = [w for w in report["warnings"] if w.startswith("CONFOUND")]
    assert len(confounds) == 1 and report["summary"]["confound_pairs"] == 1
    assert confounds[0].startswith("CONFOUND: colour mode separates daisy from tulips: daisy 100% RGB, tulips 100% L "
                                   "(separation 1.00, 40 vs 40 images)")
    assert any(r.levelname == "ERROR" and r.getMessage() == confounds[0] for r in caplog.records)
    assert "| daisy / tulips | colour mode |" in "\n".join(audit_markdown(report))
