"""Seeds and random states: one `seed` makes a CPU run repeatable, and every state can be saved and restored.

Random streams of a run and who owns them:
- python `random`, numpy's global RNG, torch's global RNG (dropout, drop-path): `seed_everything`.
- the train DataLoader's generator: each epoch's order and one augmentation seed per image, drawn in the
  main process (data/sampler.py SeededSampler); ImageDataset re-seeds the transform with it (`seed_transform`;
  albumentations ignores the global seeds), so batches do not depend on the workers.
- in DataLoader workers: `seed_worker` derives python/numpy and the transform's RNGs from the worker's
  torch seed (base seed + worker id): eval loaders, and anything in a worker outside the transform.
"""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a generator for the train DataLoader."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seed_transform(transform, seed: int) -> None:
    """Give an albumentations pipeline one numpy and one python RNG from `seed` (shared by all its ops)."""
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: per-worker seeds, and leave SIGINT/SIGTERM to the main process.

    Workers ignore the signals so that Ctrl-C (sent to the whole process group) lets the main process
    finish its step and save `last` instead of losing its workers mid-batch.
    """
    seed = (torch.initial_seed() + 1_000_003 * int(os.environ.get("RANK", "0"))) % 2**32  # torchrun ranks differ
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(getattr(info, "dataset", None), "transform", None)
    if transform is not None:
        seed_transform(transform, seed)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _np_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state  # plain dict of str/int: loads with weights_only=True


def get_global_rng_state() -> dict:
    """python, numpy and torch global RNG states (torch.save-able, weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def set_global_rng_state(state: dict) -> None:
    n = state["numpy"]
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


def _as_tuple(x):
    """random.setstate needs tuples; a save/load round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def get_transform_rng_state(transform) -> dict | None:
    """The albumentations pipeline's numpy and python RNG states (None for a transform without them)."""
    if not hasattr(transform, "random_generator"):
        return None
    return {"numpy": _np_state(transform.random_generator), "python": transform.py_random.getstate()}


def set_transform_rng_state(transform, state: dict | None) -> None:
    """Restore `get_transform_rng_state` output (re-attached to every op of the pipeline)."""
    if state is None or not hasattr(transform, "set_random_state"):
        return
    rng = np.random.default_rng()
    rng.bit_generator.state = state["numpy"]
    py = random.Random()
    py.setstate(_as_tuple(state["python"]))
    transform.set_random_state(rng, py)
