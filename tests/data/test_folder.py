"""Data stage: listing, skipping bad files, splitting, run-time skips, decoded-image cache."""
from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg, make_imagefolder, write_image
from pipeline.data.augment import build_eval_transform
from pipeline.data.folder import (
    ImageDataset,
    Split,
    SplitLayout,
    collate_skip_none,
    load_imagefolder,
    read_skip_log,
    stratified_split,
)
from pipeline.data.image_cache import DiskCache, MemoryCache, build_cache
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.data.build import dataset_root
from pipeline.data.sources import write_digits_imagefolder
from pipeline.errors import MissingFileError


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
    write_image(root / "train/red/.ipynb_checkpoints/red_0-checkpoint.png", (200, 30, 30))  # a usable image, hidden
    write_image(root / "train/blue/.hidden.png", (20, 40, 200))
    (root / "train/blue/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train/blue/no_extension").write_bytes(b"x")

    data = load_imagefolder(root, SplitLayout(val_fraction=0.25), seed=0)
    reported = {p.split("/")[-1]: r for p, r in ((s["path"], s["reason"]) for s in data.skipped)}
    assert reported == {"notes.txt": "unsupported extension .txt", "empty.jpg": "0-byte file",
                        "fake.jpg": "text/HTML, not an image", "truncated.png": "truncated image file",
                        "red_0-checkpoint.png": "in a hidden folder (.ipynb_checkpoints)", ".hidden.png": "hidden file",
                        ".DS_Store": "hidden file", "no_extension": "no file extension"}
    used = data.train.paths + data.val.paths
    assert len(used) == 13 and any(p.endswith("anim.gif") for p in used)  # a valid GIF is a usable image
    assert not any(p.endswith(tuple(reported)) for p in used)


def test_val_and_test_folders_are_used_when_present(tiny_folder):
    make_imagefolder(tiny_folder, {"blue": 2, "green": 2, "red": 2}, "test", offset=900)
    data = load_imagefolder(tiny_folder)
    assert data.classes == ["blue", "green", "red"]
    assert data.val_source == "val" and len(data.val) == 12 and len(data.test) == 6 and len(data.train) == 36


def test_layout_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class folders with images .*: expected .*/<class>/<image> or "
                                                ".*/train/<class>/<image>"):
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
        dataset_root(compose_cfg(["dataset=hymenoptera", f"dataset.root={tmp_path / 'nowhere'}"]).dataset)
    with pytest.raises(ValueError, match="needs a root: add dataset.root=.* \\(or dataset.manifest="):
        dataset_root(compose_cfg(["dataset=folder"]).dataset)


def test_a_flat_tree_of_class_folders_is_a_dataset(tmp_path):
    """No train/ folder: the class folders are the dataset, and val is a stratified share of all of it."""
    root = make_imagefolder(tmp_path, {"blue": 5, "red": 5}, split="flat") / "flat"
    assert dataset_root(compose_cfg(["dataset=folder", f"dataset.root={root}"]).dataset) == root
    data = load_imagefolder(root, SplitLayout(val_fraction=0.2), seed=0, workers=1)
    assert data.classes == ["blue", "red"] and len(data.train) == 8 and data.val.counts() == {"blue": 1, "red": 1}
    assert data.test is None and data.val_source == "stratified 20% of all images" and "no train/" in data.layout
    (tmp_path / "manifest.csv").write_text("path,label\n", encoding="utf-8")
    assert dataset_root(compose_cfg(["dataset=folder", f"dataset.manifest={tmp_path / 'manifest.csv'}"]).dataset) \
        == tmp_path


def test_a_download_that_cannot_connect_is_a_one_line_error_and_leaves_nothing(tmp_path):
    """Offline (here: a closed local port), `dataset.download=true` names the URL and the way out."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MissingFileError, match=rf"Could not download dataset.url=http://127.0.0.1:{port}/x.zip .*"
                                               "offline\\? set DATASETS_DIR"):
        dataset_root(compose_cfg(["dataset=flowers", f"dataset.root={tmp_path / 'flowers'}",
                                  f"dataset.url=http://127.0.0.1:{port}/x.zip", "dataset.download=true"]).dataset)
    assert list(tmp_path.iterdir()) == []  # no half-made dataset root


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


# --- run-time skips, decoded-image cache -------------------------------------------------------------

SMALL = {"input_size": [3, 48, 48], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
         "crop_pct": 0.875}  # eval resize: short side floor(48 / 0.875) = 54


def _photos(tmp_path, n: int = 4) -> list[str]:
    return [str(write_image(tmp_path / f"p{i}.jpg", (40 * i, 90, 200), size=120 + 10 * i, seed=i, fmt="JPEG"))
            for i in range(n)]


def test_unreadable_file_in_a_worker_is_skipped_and_logged(tmp_path):
    paths = _photos(tmp_path, 6)
    Path(paths[2]).write_bytes(b"corrupted after listing")
    log = tmp_path / "skips.jsonl"
    ds = ImageDataset(Split(paths, [0, 1] * 3, ["a", "b"]), build_eval_transform(SMALL), skip_log=log)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate_skip_none)
    for _ in range(2):  # two epochs: the same file fails twice
        seen = sum(len(y) for _, y in loader)
        assert seen == 5
    skips = read_skip_log(log)
    assert len(skips) == 1 and skips[0]["path"] == paths[2] and skips[0]["times"] == 2
    assert skips[0]["reason"] == "at run time: text/HTML, not an image"
    assert collate_skip_none([None, None]) is None


def test_channels_last_collate_gives_the_same_batch_in_nhwc_memory(tmp_path):
    """Through a worker process (shared memory): the same values and labels as the NCHW stack, in the memory
    format the channels_last model takes without a copy, and a skipped file still dropped."""
    paths = _photos(tmp_path, 5)
    Path(paths[1]).write_bytes(b"corrupted after listing")
    ds = ImageDataset(Split(paths, [0, 1, 0, 1, 1], ["a", "b"]), build_eval_transform(SMALL))
    plain, nhwc = (next(iter(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1, collate_fn=functools.partial(
        collate_skip_none, channels_last=cl)))) for cl in (False, True))
    assert nhwc[0].is_contiguous(memory_format=torch.channels_last) and plain[0].is_contiguous()
    assert torch.equal(nhwc[0], plain[0]) and torch.equal(nhwc[1], plain[1]) and len(nhwc[1]) == 4


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_eval_images_equal_uncached(tmp_path, mode):
    paths = _photos(tmp_path)
    cache = build_cache(mode, paths=paths, short_side=54, interpolation="bicubic", cache_dir=tmp_path / "cache")
    tf = build_eval_transform(SMALL)
    for p in paths:
        cached = cache(p)
        assert min(cached.shape[:2]) == 54  # stored at the size the transform needs, not the 120-150 px original
        assert torch.equal(tf(image=cached)["image"], tf(image=load_rgb(p))["image"])


def test_disk_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    import pipeline.data.image_cache as image_cache

    path = _photos(tmp_path, 1)[0]
    cache = DiskCache(tmp_path / "cache", 54)
    first = cache(path)
    files = list((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), first)
    monkeypatch.setattr(image_cache, "decode_for_cache", lambda *a: pytest.fail("decoded again"))
    assert np.array_equal(cache(path), first)  # served from disk
    monkeypatch.undo()
    write_image(Path(path), (0, 255, 0), size=100, seed=9, fmt="JPEG")  # new content, size and mtime
    assert not np.array_equal(cache(path), first) and len(list((tmp_path / "cache").rglob("*.npy"))) == 2


def test_memory_cache_packs_resized_images_and_reports_bad_files(tmp_path):
    paths = _photos(tmp_path, 3)
    (tmp_path / "bad.jpg").write_bytes(b"xx")
    small = str(write_image(tmp_path / "small.png", (1, 2, 3), size=30))  # smaller than the target: kept as is
    cache = MemoryCache(paths + [str(tmp_path / "bad.jpg"), small], short_side=54)
    assert cache.buffer.nbytes == 3 * 54 * 54 * 3 + 30 * 30 * 3
    assert cache(small).shape == (30, 30, 3) and cache(paths[0]).shape == (54, 54, 3)
    cache(paths[0])[:] = 0  # callers get a copy: the cache itself is unchanged
    assert cache(paths[0]).any()
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        cache(str(tmp_path / "bad.jpg"))


def test_training_with_disk_cache_survives_a_file_broken_after_listing(tiny_folder, cfg_factory, monkeypatch):
    import pipeline.data.folder as data

    original = data.load_imagefolder

    def load_then_break(*args, **kwargs):
        splits = original(*args, **kwargs)
        Path(splits.train.paths[0]).write_bytes(b"broken mid-run")
        return splits

    monkeypatch.setattr(data, "load_imagefolder", load_then_break)
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "backbone.input_size=32",
                      "dataset.cache=disk", "trainer.num_workers=1", "trainer.max_train_batches=0",
                      "strategy=finetune")
    from pipeline.train import train
    metrics = train(cfg)
    assert metrics["skipped_at_runtime"] == 1
    summary = (Path(cfg.output_dir) / "summary.md").read_text()
    assert "at run time: " in summary
    assert json.loads((Path(cfg.output_dir) / "metrics.json").read_text())["skipped_files"] == 1
    assert len(list(Path(cfg.dataset.cache_dir).rglob("*.npy"))) == 36 + 12 - 1  # every readable file cached


def test_cache_auto_caches_only_repeated_reads_that_fit_the_ram_budget(tiny_folder, monkeypatch):
    from pipeline.data import image_cache

    paths = sorted(str(p) for p in tiny_folder.rglob("*.png"))  # 48 images of 40x40: 230 KB decoded
    assert image_cache.resolve_auto(paths, 54, repeated=True, ram_fraction=0.25) == "memory"
    assert image_cache.resolve_auto(paths, 54, repeated=False, ram_fraction=0.25) == "none"  # read once: no gain
    monkeypatch.setattr(image_cache, "available_ram", lambda: 200_000)  # 50 KB budget < 230 KB needed
    assert image_cache.resolve_auto(paths, 54, repeated=True, ram_fraction=0.25) == "none"


def test_fine_tune_uses_the_memory_cache_by_default_and_the_cached_probe_does_not(tiny_folder, cfg_factory, tmp_path):
    from pipeline.train import train

    common = ("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "backbone.input_size=32")
    tuned = train(cfg_factory(*common, "strategy=finetune", f"output_dir={tmp_path / 'ft'}"))
    probed = train(cfg_factory(*common, "strategy=linear_probe", f"output_dir={tmp_path / 'lp'}"))
    assert tuned["image_cache"] == "memory" and probed["image_cache"] == "none"


def test_a_strip_image_is_skipped_by_the_probe_with_its_reason(tmp_path):
    root = make_imagefolder(tmp_path / "ds", {"blue": 4, "red": 4})
    Image.new("L", (60000, 1), 90).save(root / "train/red/strip.png")  # ~200 bytes, 256 x 15M px once resized
    data = load_imagefolder(root, SplitLayout(val_fraction=0.25), seed=0)
    skipped = {Path(s["path"]).name: s["reason"] for s in data.skipped}
    assert list(skipped) == ["strip.png"] and skipped["strip.png"].startswith("60000x1 is a strip, not a picture")
    assert "strip.png" not in {Path(p).name for p in data.train.paths + data.val.paths}


_SLOW_PROBE = """
import os, sys, time
from pipeline.data import folder
real = folder.check_decodable_image
def slow(path, max_pixels):
    os.write(1, b"started\\n")  # one write: the two threads' lines never interleave
    time.sleep(0.5)
    return real(path, max_pixels=max_pixels)
folder.check_decodable_image = slow
folder.check_decodable_files(sys.argv[1:] * 1000, folder.DEFAULT_MAX_PIXELS, workers=2)
"""


def test_ctrl_c_during_probing_exits_within_2_s(tmp_path):
    """200 files listed 1000 times: 200000 probes of 0.5 s on 2 threads. SIGINT ends the process once the 2 probes in
    progress end, also while the files are still being queued (queueing all of them up front took ~1 s here, and an
    interrupt then ran every file already queued)."""
    paths = [str(write_image(tmp_path / f"{i}.png", (9, 9, 9), size=8)) for i in range(200)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PROBE, *paths], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2], text=True)
    assert proc.stdout.readline() == "started\n"
    time.sleep(0.2)  # the first probe runs; queueing all files up front would be about 1/5 done
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    took = time.monotonic() - start
    assert took < 2.0, f"took {took:.1f} s after SIGINT"
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr.read()
