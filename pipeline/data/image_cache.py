"""Decoded-image cache (`dataset.cache=auto|memory|disk|none`): decode each file once, keep it resized.

Images are stored as uint8 RGB with the short side shrunk to what the transform needs
(floor(input_size / crop_pct), timm's eval resize; never enlarged), so later epochs skip the
JPEG decode and most of the resize. The eval transform of a cached image is identical to the
uncached one (same PIL resize, after which its own resize is a no-op).

- memory: filled up front in the main process (threads) into one contiguous numpy buffer;
  DataLoader workers forked from it read it copy-free.
- auto (default): memory when the images are read more than once and fit the RAM budget (`resolve_auto`).
- disk: `.npy` files under `<cache_dir>/<short_side>_<interpolation>/`, keyed by file path, size,
  mtime and target size; written atomically on first use by whichever worker decodes the file.

A cache that cannot be had is never fatal: a refused buffer allocation, or a disk cache write that fails (disk
full, read-only dir), warns once and the run goes on decoding uncached. Ctrl-C during the up-front fill cancels
the images not yet started (`map_threads`) and stops at once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pipeline.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    load_rgb,
    open_image,
    resize_short_side,
    resized_shape,
)
from pipeline.errors import OutputError
from pipeline.runtime import memory
from pipeline.runtime.files import write_atomic

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_WARN_LOCK = threading.Lock()  # one warning per cache, whichever thread fails first


def map_threads(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list:
    """`[fn(x) for x in items]` in `workers` threads. On Ctrl-C (or any error) the items not started are cancelled
    and the exception passes on at once, without waiting for the pool (`shutdown(wait=False, cancel_futures=True)`):
    only the few items already running finish, so an interrupted cache fill stops in well under a second."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(fn, x) for x in items]
        results = [f.result() for f in futures]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def decode_for_cache(path: str, short_side: int, interpolation: str, max_pixels: int) -> np.ndarray:
    """Decode `path` and shrink its short side to `short_side` (smaller images are kept as they are)."""
    img = load_rgb(path, max_pixels=max_pixels)
    if min(img.shape[:2]) > short_side:
        img = resize_short_side(img, short_side, interpolation)
    return np.ascontiguousarray(img)


def cache_key(path: str, short_side: int, interpolation: str) -> str:
    """Hash of absolute path, file size, mtime and the target size: any change to the file invalidates it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot stat file: {e.strerror or e}") from None
    raw = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{short_side}|{interpolation}|v{FORMAT_VERSION}"
    return hashlib.sha1(raw.encode()).hexdigest()


class DiskCache:
    """Callable path -> uint8 RGB array, backed by `.npy` files (safe to share between worker processes)."""

    def __init__(self, cache_dir: str | Path, short_side: int, interpolation: str = "bicubic",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.dir = Path(cache_dir) / f"{short_side}_{interpolation}"
        self.short_side, self.interpolation, self.max_pixels = short_side, interpolation, max_pixels
        self.write_failed = False  # set by the first failed write (per process: DataLoader workers each warn once)

    def file_for(self, path: str) -> Path:
        key = cache_key(path, self.short_side, self.interpolation)
        return self.dir / key[:2] / f"{key}.npy"

    def __call__(self, path: str) -> np.ndarray:
        file = self.file_for(path)
        try:
            return np.load(file, allow_pickle=False)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except (ValueError, OSError, EOFError):  # a torn or foreign file: rebuild it
            if not self.write_failed:
                _logger.warning("Rebuilding unreadable cache file %s", file)
        img = decode_for_cache(path, self.short_side, self.interpolation, self.max_pixels)
        if not self.write_failed:
            try:
                write_atomic(file, lambda p: _save_npy(p, img))  # temp name per process and thread: workers share it
            except OutputError as e:  # disk full, read-only or vanished dir: the run goes on uncached
                self._stop_writing(e)
        return img

    def _stop_writing(self, error: OutputError) -> None:
        """After the first failed write: warn once (one line: the cache, why) and write no more."""
        with _WARN_LOCK:
            if self.write_failed:
                return
            self.write_failed = True
        cause = error.__cause__
        reason = getattr(cause, "strerror", None) or str(cause or error).splitlines()[0][:160]
        _logger.warning("Disk image cache %s cannot be written (%s): carrying on without caching (images are decoded "
                        "every time); free space there, set dataset.cache_dir=... elsewhere, or dataset.cache=none",
                        self.dir, reason)


def _save_npy(path: Path, img: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temp path
        np.save(f, img, allow_pickle=False)


def planned_pixels(path: str, short_side: int) -> int:
    """Pixel count of `path` after the cache resize, from the header (EXIF rotation does not change it); 0 for a
    file that does not open (the cache records its reason when it decodes it)."""
    try:
        with open_image(path) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError):
        return 0
    if min(h, w) <= short_side:
        return h * w
    new_h, new_w = resized_shape(h, w, short_side)
    return new_h * new_w


def available_ram() -> int:
    """Bytes this rank may fill: the smallest of MemAvailable, the cgroup limit and the Slurm job's memory, shared
    among the local ranks (runtime/memory.py); logs which limit binds."""
    budget = memory.memory_budget()
    _logger.info("Memory budget: %s", budget.describe())
    return budget.per_rank


def resolve_auto(paths: list[str], short_side: int, *, repeated: bool, ram_fraction: float,
                 workers: int = 2) -> str:
    """`dataset.cache=auto`: "memory" when the images are read more than once (fine-tuning reads them every
    epoch; the cached linear probe once) and their decoded copies fit in `ram_fraction` of this rank's memory
    budget (`available_ram`: host, cgroup and Slurm limits, shared among the ranks on the node); else "none".
    The size comes from the file headers (no decode)."""
    if not repeated or not paths:
        return "none"
    need = 3 * sum(map_threads(lambda p: planned_pixels(p, short_side), list(dict.fromkeys(paths)), workers))
    budget = ram_fraction * available_ram()
    mode = "memory" if need <= budget else "none"
    _logger.info("dataset.cache=auto -> %s: decoded images need %.0f MB, budget %.0f MB (dataset.cache_ram_fraction "
                 "%.2f of this rank's memory budget)", mode, need / 2**20, budget / 2**20, ram_fraction)
    return mode


def allocate(nbytes: int) -> np.ndarray:
    """The memory cache's one buffer (MemoryError when the allocation is refused)."""
    return np.empty(nbytes, np.uint8)


class MemoryCache:
    """Callable path -> uint8 RGB array; every image decoded up front into one contiguous buffer."""

    def __init__(self, paths: list[str], short_side: int, interpolation: str = "bicubic",
                 max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 2):
        self.short_side, self.interpolation, self.max_pixels = short_side, interpolation, max_pixels
        self.errors: dict[str, str] = {}
        start = time.perf_counter()
        paths = list(dict.fromkeys(paths))
        sizes = [planned_pixels(p, short_side) for p in paths]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.index: dict[str, tuple[int, int, int]] = {}  # path -> (offset, height, width)
        try:
            self.buffer = allocate(int(offsets[-1]) * 3)
        except MemoryError:  # the images are decoded every time instead (`__call__` of an uncached path)
            self.buffer = np.empty(0, np.uint8)
            _logger.warning("Memory image cache: cannot allocate %.0f MB for %d images: carrying on without caching; "
                            "set dataset.cache=disk or dataset.cache=none", int(offsets[-1]) * 3 / 2**20, len(paths))
            return
        map_threads(lambda i: self._fill(paths[i], int(offsets[i]), sizes[i]), range(len(paths)), workers)
        _logger.info("Cached %d images in memory (%.0f MB, short side %d) in %.1f s", len(self.index),
                     self.buffer.nbytes / 2**20, short_side, time.perf_counter() - start)

    def _fill(self, path: str, offset: int, pixels: int) -> None:
        try:
            img = decode_for_cache(path, self.short_side, self.interpolation, self.max_pixels)
        except ImageDecodeError as e:
            self.errors[path] = str(e)
            return
        h, w = img.shape[:2]
        if h * w != pixels:  # header disagreed with the pixels (rare): keep the image out of the buffer
            self.errors[path] = f"{path}: decoded size {w}x{h} differs from its header; not cached"
            return
        self.buffer[3 * offset:3 * (offset + pixels)] = img.reshape(-1)
        self.index[path] = (offset, h, w)

    def __call__(self, path: str) -> np.ndarray:
        slot = self.index.get(path)
        if slot is None:
            if path in self.errors and "not cached" not in self.errors[path]:
                raise ImageDecodeError(self.errors[path])
            return decode_for_cache(path, self.short_side, self.interpolation, self.max_pixels)
        offset, h, w = slot
        return self.buffer[3 * offset:3 * (offset + h * w)].reshape(h, w, 3).copy()  # transforms may write


def build_cache(mode: str, *, paths: list[str], short_side: int, interpolation: str = "bicubic",
                max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: str | Path = "data/cache",
                workers: int = 2) -> Optional[Callable[[str], np.ndarray]]:
    """The decoded-image cache for `dataset.cache` (None for `none`)."""
    if mode == "none":
        return None
    if mode == "disk":
        return DiskCache(cache_dir, short_side, interpolation, max_pixels)
    return MemoryCache(paths, short_side, interpolation, max_pixels, workers=workers)
