"""runtime/seeding.py: repeatable DataLoader workers and RNG states that survive a save."""
from __future__ import annotations

import random

import albumentations as A
import numpy as np
import torch

from pipeline.model import checkpoint
from pipeline.runtime import seeding


class _Draws(torch.utils.data.Dataset):
    def __init__(self):
        self.transform = A.Compose([A.HorizontalFlip(p=0.5)])
        seeding.seed_transform(self.transform, 0)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([self.transform.py_random.random(), torch.utils.data.get_worker_info().id])


def _worker_draws(seed: int) -> list:
    loader = torch.utils.data.DataLoader(_Draws(), batch_size=2, num_workers=2, worker_init_fn=seeding.seed_worker,
                                         generator=torch.Generator().manual_seed(seed))
    return torch.cat(list(loader)).tolist()


def test_workers_get_distinct_repeatable_augmentation_seeds():
    first, again, other = _worker_draws(7), _worker_draws(7), _worker_draws(8)
    assert first == again and first != other
    by_worker = {w: [d for d, wid in first if wid == w] for w in (0, 1)}
    assert by_worker[0] != by_worker[1]  # not the same stream copied into both workers


def test_rng_states_round_trip_through_a_saved_state(tmp_path):
    transform = A.Compose([A.HorizontalFlip(p=0.5)])
    seeding.seed_everything(3)
    seeding.seed_transform(transform, 3)
    checkpoint.save_state(tmp_path, {"g": seeding.get_global_rng_state(),
                                     "t": seeding.get_transform_rng_state(transform)})
    draws = lambda: (random.random(), np.random.rand(), torch.rand(1).item(), transform.py_random.random(),
                     transform.random_generator.random())
    expected = draws()
    state = checkpoint.load_state(tmp_path / "last.pt")  # weights_only=True
    seeding.set_global_rng_state(state["g"])
    seeding.set_transform_rng_state(transform, state["t"])
    assert draws() == expected
