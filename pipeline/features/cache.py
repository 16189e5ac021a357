"""Frozen-backbone features computed once and cached on disk (the feature-extractor fast path).

A cache entry is `<cache_dir>/<key>.safetensors` (features, labels, the split indices that decoded) plus
`<key>.json` (what went into the key, sizes, extraction speed). The key hashes everything the features
depend on: backbone name, a hash of its weights, the split's file list (path, size, mtime), the
preprocessing (data config; for augmented views also the augment config, view number, seed and worker
count, which decide each image's random augmentation) and the feature levels. Change any of them and the
features are recomputed; otherwise the entry is reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.data import sampler
from pipeline.data.device_decode import DeviceBatches
from pipeline.data.folder import ImageDataset, Split, collate_skip_none
from pipeline.data.images import DEFAULT_MAX_PIXELS
from pipeline.errors import OutputError, PipelineError
from pipeline.model.multidepth import HEAD
from pipeline.runtime import distributed
from pipeline.runtime.files import write_atomic, write_json
from pipeline.runtime.seeding import seed_transform, seed_worker
from pipeline.transfer.separability import extract_features

_logger = logging.getLogger(__name__)


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the backbone's tensors (names, shapes, bytes); the classifier is left out."""
    head = {id(p) for p in model.get_classifier().parameters()} if hasattr(model, "get_classifier") else set()
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in head:
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def files_hash(paths: Sequence[str]) -> str:
    """sha256 over (path, size, mtime) of every file: adding, removing or touching a file changes it."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def model_key(arch: str, model: torch.nn.Module, transform) -> dict:
    """The key parts of features of backbone `arch` (its weights hashed) under `transform` (albumentations' repr lists
    every op with its arguments: the preprocessing part of the key)."""
    return {"arch": arch, "weights": weights_hash(model), "transform": repr(transform)}


def cache_key(parts: dict) -> str:
    """Stable short hash of a JSON-able description of the features."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Extraction:
    """How `load_or_extract` extracts: the feature `levels` (default: the pre-logits), on `device`, in batches of
    `batch_size` with `num_workers` DataLoader workers, `channels_last`, images through `image_cache`, entries under
    `cache_dir` (None: no disk cache). `device_preprocessing` (a data config; `dataset.decode=gpu`): decode and
    preprocess on `device` instead of running the transform on the CPU (data/device_decode.py; part of the key)."""
    device: torch.device
    cache_dir: str | Path | None
    levels: Sequence = (HEAD,)
    batch_size: int = 64
    num_workers: int = 0
    channels_last: bool = False
    image_cache: Any = None
    device_preprocessing: dict | None = None


class _Indexed(torch.utils.data.Dataset):
    """ImageDataset items with their index, so skipped (undecodable) samples can be accounted for."""

    def __init__(self, base: ImageDataset):
        self.base = base
        self.transform = base.transform  # seeding.seed_worker seeds it in each worker

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        return None if item is None else (*item, i)


def _check_decoded(out: dict, split: Split, name: str) -> dict:
    if not len(out["labels"]):
        raise PipelineError(f"No image of the {name} split could be decoded ({len(split)} file(s), e.g. "
                            f"{split.paths[0] if len(split) else 'none'}); run `make audit` on this dataset to see why")
    return out


def threaded_batches(dataset, indices: list[int], batch_size: int, threads: int) -> Iterator:
    """Batches of `dataset[indices]` in order, as a DataLoader without workers would give them, but the next batch
    is decoded by `threads` threads while the caller runs the model on this one. PIL and OpenCV release the GIL
    while decoding and resizing, and no worker process has to start (bench: 65 img/s against 49-59 serial)."""
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    with ThreadPoolExecutor(max(1, threads)) as pool, ThreadPoolExecutor(1) as ahead:
        def make(chunk: list[int]):
            return collate_skip_none(list(pool.map(dataset.__getitem__, chunk)))
        pending = ahead.submit(make, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            batch = pending.result()
            if k + 1 < len(chunks):
                pending = ahead.submit(make, chunks[k + 1])
            yield batch


def load_or_extract(model: torch.nn.Module, split: Split, transform, how: Extraction, *, key_parts: dict,
                    name: str = "features", seed: int | None = None) -> dict:
    """Cached features for `split` under `transform`, extracted as `how` says (see the module doc).
    `seed`: a random (augmenting) transform is seeded from it, in the main process or per worker.

    Under torchrun rank 0 reads the cache (and broadcasts it), or each rank extracts a contiguous shard,
    the shards are gathered and rank 0 writes the entry.
    Returns {features, labels, index, hit, key, seconds, img_per_s}."""
    parts = {**key_parts, "levels": [str(v) for v in how.levels], "files": files_hash(split.paths),
             **({"decode": "device"} if how.device_preprocessing else {})}
    key = cache_key(parts)
    path = Path(how.cache_dir) / f"{key}.safetensors" if how.cache_dir else None
    entry = distributed.from_main(lambda: _read_entry(path))
    if entry is not None:
        t, info = entry
        _logger.info("Feature cache hit (%s): %s, %d x %d", name, path, *t["features"].shape)
        return {**t, "hit": True, "key": key, "seconds": 0.0, "img_per_s": info.get("img_per_s", float("nan")),
                "extracted_seconds": info.get("seconds", float("nan"))}
    dataset = _Indexed(ImageDataset(split, transform, cache=how.image_cache))
    shard = sampler.distributed_sampler(len(dataset), None, train=False, rank=distributed.rank(),
                                        world=distributed.world_size())
    if how.device_preprocessing is not None and seed is None:
        indices = list(shard) if shard is not None else list(range(len(dataset)))
        loader = DeviceBatches(split, how.device_preprocessing, how.device, how.batch_size,
                               max_pixels=DEFAULT_MAX_PIXELS, indices=indices)
    elif how.num_workers == 0 and seed is None:  # a deterministic transform: safe to run in threads, in any order
        indices = list(shard) if shard is not None else list(range(len(dataset)))
        loader = threaded_batches(dataset, indices, how.batch_size, threads=torch.get_num_threads())
    else:
        seeded = {}
        if seed is not None:
            seed_transform(transform, seed)  # used as is when num_workers=0; workers reseed their copy
            seeded = dict(generator=torch.Generator().manual_seed(seed), worker_init_fn=seed_worker)
        loader = torch.utils.data.DataLoader(dataset, batch_size=how.batch_size, shuffle=False, sampler=shard,
                                             num_workers=how.num_workers, collate_fn=collate_skip_none,
                                             persistent_workers=False, **seeded)
    out = extract_features(model, loader, how.levels, how.device, how.channels_last)
    out = _check_decoded(_gather(out), split, name)
    _logger.info("Feature cache miss (%s): extracted %d x %d in %.1f s (%.1f img/s)", name,
                 *out["features"].shape, out["seconds"], out["img_per_s"])
    if path is not None and distributed.is_main():
        _write_entry(path, out, {"name": name, "key_parts": parts, "n": int(len(out["labels"])),
                                 "dim": int(out["features"].shape[1]), "seconds": out["seconds"],
                                 "img_per_s": out["img_per_s"]})
    return {**out, "hit": False, "key": key, "extracted_seconds": out["seconds"]}


def _write_entry(path: Path, out: dict, info: dict) -> None:
    """Store a cache entry; a failed write (disk full, unwritable dir) is one warning, and the run goes on with
    the features it has (the next run extracts them again)."""
    tensors = {k: out[k].contiguous() for k in ("features", "labels", "index")}
    try:
        write_atomic(path, lambda p: save_file(tensors, str(p)))
        write_json(path.with_suffix(".json"), info)
    except OutputError as e:
        cause = e.__cause__
        reason = getattr(cause, "strerror", None) or str(cause or e).splitlines()[0][:160]
        _logger.warning("Feature cache %s cannot be written (%s): carrying on without caching these features; free "
                        "space there or set features.cache_dir=... elsewhere", path.parent, reason)


def _read_entry(path: Path | None) -> tuple[dict, dict] | None:
    """(tensors, info) of a cache entry, or None when there is none."""
    if path is None or not path.is_file():
        return None
    info = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
    return load_file(str(path)), info


def _gather(out: dict) -> dict:
    """DDP: the ranks' shards of `extract_features` concatenated in rank order (= split order); speed over all ranks."""
    if not distributed.is_distributed():
        return out
    parts = [p for p in distributed.all_gather_object(out) if len(p["labels"])] or [out]
    seconds = max(p["seconds"] for p in parts)
    merged = {k: torch.cat([p[k] for p in parts]) for k in ("features", "labels", "index")}
    return {**merged, "seconds": seconds, "img_per_s": len(merged["labels"]) / max(seconds, 1e-9)}


def as_numpy(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    return entry["features"].numpy(), entry["labels"].numpy()
