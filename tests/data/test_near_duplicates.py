"""Near-duplicate leakage: resized and re-encoded copies across splits are found, distinct images are not."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from conftest import compose_cfg
from pipeline.data.data_audit import audit_dataset, run_audit
from pipeline.data.folder import load_imagefolder
from pipeline.data.near_duplicates import hamming_pairs


def write_scene(path: Path, seed: int, size: int = 96, quality: int = 90) -> Path:
    """A random scene of coloured shapes (distinct seeds give distinct layouts), saved as JPEG."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 20, 2)
        w, h = rng.integers(15, size // 2, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=quality)
    return path


def scene_folder(root: Path, n: int = 12) -> Path:
    """train/val/test of distinct scenes (two classes), plus three copies: a train image at half size and JPEG
    quality 60 in val, a re-encoded train image in test, a re-encoded val image in test."""
    for split, offset in (("train", 0), ("val", 100), ("test", 200)):
        for cls in ("a", "b"):
            for i in range(n):
                write_scene(root / split / cls / f"{cls}{i}.jpg", seed=offset + i + (1000 if cls == "b" else 0))
    small = Image.open(root / "train/a/a0.jpg").resize((48, 48), Image.BILINEAR)
    small.save(root / "val/a/a0_half_q60.jpg", format="JPEG", quality=60)
    Image.open(root / "train/b/b1.jpg").save(root / "test/b/b1_q50.jpg", format="JPEG", quality=50)
    Image.open(root / "val/a/a2.jpg").save(root / "test/b/a2_relabelled.png")  # and under the other label
    return root


def test_resized_and_reencoded_copies_across_splits_are_found_distinct_images_are_not(tmp_path):
    root = scene_folder(tmp_path / "ds")
    data = load_imagefolder(root)
    report = audit_dataset(data, root=root, checks=compose_cfg().audit, seed=0)
    found = {(Path(p["files"][0]["path"]).name, Path(p["files"][1]["path"]).name): p
             for p in report["near_duplicates"]["pairs"]}
    assert set(found) == {("a0.jpg", "a0_half_q60.jpg"), ("b1.jpg", "b1_q50.jpg"), ("a2.jpg", "a2_relabelled.png")}
    assert [f["split"] for f in found[("a0.jpg", "a0_half_q60.jpg")]["files"]] == ["train", "val"]
    assert not found[("a2.jpg", "a2_relabelled.png")]["same_class"] and found[("b1.jpg", "b1_q50.jpg")]["same_class"]
    assert max(p["distance"] for p in found.values()) <= 12
    assert report["summary"]["eval_files_near_leaked"] == 3 and report["summary"]["eval_files_leaked"] == 0
    assert any(w.startswith("DATA LEAKAGE (near-duplicates): 3 val/test file(s)") for w in report["warnings"])


def test_distance_threshold_and_byte_identical_copies(tmp_path):
    root = scene_folder(tmp_path / "ds", n=3)
    (root / "val/a/exact.jpg").write_bytes((root / "train/b/b2.jpg").read_bytes())  # the exact check's, not ours
    data = load_imagefolder(root)
    report = audit_dataset(data, root=root, checks=compose_cfg(["audit.near_duplicate_distance=0"]).audit, seed=0)
    names = {Path(p["files"][1]["path"]).name for p in report["near_duplicates"]["pairs"]}
    assert "exact.jpg" not in names and "a0_half_q60.jpg" not in names  # a resized copy is not bit-identical
    assert report["summary"]["eval_files_leaked"] == 1


def test_hamming_pairs_counts_bits():
    zero, one_bit, far = "00" * 32, "00" * 31 + "01", "ff" * 32
    assert hamming_pairs([one_bit, far], [zero], 1) == [(0, 0, 1)]
    assert hamming_pairs([far], [zero], 256) == [(0, 0, 256)] and hamming_pairs([], [zero], 5) == []


def test_dedup_drop_near_from_eval_drops_the_near_duplicates(tmp_path):
    root = scene_folder(tmp_path / "ds", n=4)
    data = load_imagefolder(root)
    checks = compose_cfg().audit
    kept, report = run_audit(data, name="scenes", root=root, dedup="drop_near_from_eval", checks=checks, seed=0)
    dropped = sorted(Path(p).name for p in report["dedup"]["dropped"])
    assert dropped == ["a0_half_q60.jpg", "a2_relabelled.png", "b1_q50.jpg"]
    assert len(kept.val) == len(data.val) - 1 and len(kept.test) == len(data.test) - 2
    assert kept.train.paths == data.train.paths
    assert any("removed from the eval splits" in w for w in report["warnings"])
    unchanged, _ = run_audit(data, name="scenes", root=root, dedup="drop_from_eval", checks=checks, seed=0)
    assert len(unchanged.val) == len(data.val) and len(unchanged.test) == len(data.test)
