"""Data stage: listing, skipping bad files, splitting."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data import Split, load_imagefolder, stratified_split
from pipeline.images import ImageDecodeError, load_rgb
from pipeline.sources import prepare_root, write_digits_imagefolder

from conftest import make_imagefolder, write_image


def test_stratified_split_is_stratified_and_deterministic():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    split = Split([f"img{i}.png" for i in range(100)], labels, ["a", "b", "c"])
    tr1, va1 = stratified_split(split, 0.2, seed=3)
    tr2, va2 = stratified_split(split, 0.2, seed=3)
    _, va3 = stratified_split(split, 0.2, seed=4)
    assert va1.paths == va2.paths and tr1.paths == tr2.paths
    assert va1.paths != va3.paths
    assert va1.counts() == {"a": 10, "b": 6, "c": 4}
    assert not set(tr1.paths) & set(va1.paths) and len(tr1) + len(va1) == 100


def test_bad_files_are_skipped_and_reported(tmp_path):
    root = make_imagefolder(tmp_path / "ds", {"blue": 6, "red": 6})
    (root / "train/blue/notes.txt").write_text("not an image")
    (root / "train/blue/empty.jpg").write_bytes(b"")
    (root / "train/red/fake.jpg").write_bytes(b"<html>this is not a jpeg</html>")
    good = root / "train/red/truncated.png"
    write_image(good, (1, 2, 3), size=64)
    good.write_bytes(good.read_bytes()[:200])
    frames = [Image.new("P", (30, 30), i) for i in (1, 2)]
    frames[0].save(root / "train/red/anim.gif", save_all=True, append_images=frames[1:])

    data = load_imagefolder(root, val_fraction=0.25, seed=0)
    reported = {p.split("/")[-1]: r for p, r in ((s["path"], s["reason"]) for s in data.skipped)}
    assert set(reported) == {"notes.txt", "empty.jpg", "fake.jpg", "truncated.png"}
    used = data.train.paths + data.val.paths
    assert len(used) == 13 and any(p.endswith("anim.gif") for p in used)  # a valid GIF is a usable image
    assert not any(p.endswith(("notes.txt", "empty.jpg", "fake.jpg", "truncated.png")) for p in used)


def test_val_and_test_folders_are_used_when_present(tiny_folder):
    make_imagefolder(tiny_folder, {"blue": 2, "green": 2, "red": 2}, "test", offset=900)
    data = load_imagefolder(tiny_folder)
    assert data.classes == ["blue", "green", "red"]
    assert data.val_source == "val" and len(data.val) == 12 and len(data.test) == 6 and len(data.train) == 36


def test_layout_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected .*/train/<class>/<image>"):
        load_imagefolder(tmp_path)
    make_imagefolder(tmp_path / "one", {"red": 3})
    with pytest.raises(ValueError, match="at least 2"):
        load_imagefolder(tmp_path / "one")
    root = make_imagefolder(tmp_path / "two", {"red": 3})
    (root / "train/blue").mkdir()
    (root / "train/blue/broken.jpg").write_bytes(b"xx")
    with pytest.raises(ValueError, match="fewer than 1 readable train image.*'blue': 0"):
        load_imagefolder(root)
    with pytest.raises(FileNotFoundError, match="Dataset 'hymenoptera' not found.*DATASETS_DIR"):
        prepare_root(name="hymenoptera", root=str(tmp_path / "nowhere"), download_hint="set DATASETS_DIR")


def test_odd_colour_modes_decode_to_rgb(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # fully transparent red -> white after compositing
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert (load_rgb(str(tmp_path / "rgba.png")) == 255).all()
    g16 = load_rgb(str(tmp_path / "g16.png"))
    assert g16.dtype == np.uint8 and g16.shape == (8, 8, 3) and g16.max() == 255
    assert load_rgb(str(tmp_path / "cmyk.jpg")).shape == (8, 8, 3)
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        load_rgb(str(tmp_path / "rgba.png"), max_pixels=10)


def test_digits_written_once_as_imagefolder(tmp_path):
    root = write_digits_imagefolder(tmp_path / "digits", image_size=32)
    files = sorted((root / "train").rglob("*.png"))
    assert len(files) == 1797 and sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    assert Image.open(files[0]).size == (32, 32)
    mtime = files[0].stat().st_mtime_ns
    write_digits_imagefolder(tmp_path / "digits", image_size=32)
    assert files[0].stat().st_mtime_ns == mtime
