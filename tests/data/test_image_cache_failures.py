"""The image cache never fails a run: a disk cache that cannot be written (disk full) or a memory buffer that
cannot be allocated warns once and the images are read uncached; Ctrl-C during the up-front fill stops at once."""
from __future__ import annotations

import errno
import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image
from pipeline.data import image_cache
from pipeline.data.images import ImageDecodeError, load_rgb

ROOT = Path(__file__).resolve().parents[2]


def photos(tmp_path: Path, n: int = 4) -> list[str]:
    return [str(write_image(tmp_path / "img" / f"{i}.png", (40 * i, 90, 200), size=80, seed=i)) for i in range(n)]


def expected(path: str) -> np.ndarray:
    return image_cache.decode_for_cache(path, 54, "bicubic", image_cache.DEFAULT_MAX_PIXELS)


def test_disk_cache_on_a_full_disk_warns_once_and_reads_uncached(tmp_path, monkeypatch, caplog):
    paths = photos(tmp_path)
    calls = []

    def disk_full(path, img):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image_cache, "_save_npy", disk_full)
    cache = image_cache.DiskCache(tmp_path / "cache", 54)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.image_cache"):
        images = [cache(p) for p in paths + paths]
    assert all(np.array_equal(img, expected(p)) for img, p in zip(images, paths + paths))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(cache.dir) in warnings[0] and "No space left on device" in warnings[0]
    assert len(calls) == 1  # no write is tried after the first failure
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_disk_cache_in_an_unwritable_place_warns_and_reads_uncached(tmp_path, caplog):
    paths = photos(tmp_path, 2)
    (tmp_path / "file").write_text("a file where the cache dir should be")  # mkdir fails even for root
    cache = image_cache.DiskCache(tmp_path / "file" / "cache", 54)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.image_cache"):
        assert all(np.array_equal(cache(p), expected(p)) for p in paths)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "cannot be written" in caplog.text


def test_memory_cache_allocation_failure_warns_and_reads_uncached(tmp_path, monkeypatch, caplog):
    paths = photos(tmp_path, 3)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")

    def refuse(nbytes):
        raise MemoryError(f"cannot allocate {nbytes} bytes")

    monkeypatch.setattr(image_cache, "allocate", refuse)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.image_cache"):
        cache = image_cache.build_cache("memory", paths=paths + [str(tmp_path / "bad.jpg")], short_side=54)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "Memory image cache: cannot allocate 0 MB for 4 images: carrying on without caching; "
        "set dataset.cache=disk or dataset.cache=none"]
    assert all(np.array_equal(cache(p), expected(p)) for p in paths)
    assert min(load_rgb(paths[0]).shape[:2]) == 80 and cache(paths[0]).shape[:2] == (54, 54)
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        cache(str(tmp_path / "bad.jpg"))


CHILD = textwrap.dedent("""
    import sys, time
    from pipeline.data import image_cache

    paths = sys.argv[1:]
    decode = image_cache.decode_for_cache

    def slow(*args):
        print("filling", flush=True)
        time.sleep(0.5)
        return decode(*args)

    image_cache.decode_for_cache = slow
    image_cache.MemoryCache(paths, 54, workers=2)  # 200 images x 0.5 s / 2 threads: 50 s when not interrupted
    print("filled", flush=True)
""")


def test_ctrl_c_during_the_memory_cache_fill_exits_within_2_s(tmp_path):
    paths = [str(write_image(tmp_path / "img" / f"{i}.png", (i, 50, 90), size=16, seed=i)) for i in range(200)]
    child = subprocess.Popen([sys.executable, "-c", CHILD, *paths], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("filling")  # the fill has started (two threads may print at once)
        time.sleep(0.3)
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the interrupted fill went on for 30 s")
        seconds = time.monotonic() - sent
        err = child.stderr.read()
        assert "KeyboardInterrupt" in err and "filled" not in child.stdout.read(), err[-2000:]
        assert seconds < 2.0, f"exit {seconds:.1f} s after SIGINT"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
