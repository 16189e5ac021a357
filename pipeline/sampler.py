"""Train-set sampling: plain shuffle, or a class-balanced sampler (`dataset.sampler`)."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import ConfigError

_logger = logging.getLogger(__name__)

SAMPLERS = ("shuffle", "balanced")


class BalancedClassSampler(torch.utils.data.Sampler[int]):
    """Each epoch draws `num_samples` indices with every class equally often (up to one for the remainder).

    Within a class, indices come from fresh random permutations, concatenated as often as needed: a minority
    image repeats at most ceil(quota / count) times and a majority class is sub-sampled without repeats.
    The order is shuffled across classes. Seeded: the same seed gives the same sequence of epochs.
    """

    def __init__(self, labels: Sequence[int], num_samples: int | None = None, seed: int = 0):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ConfigError("dataset.sampler=balanced needs a non-empty train split")
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.num_samples = int(num_samples or len(labels))
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict:
        """The generator state: restoring it (resume) replays the same sequence of epochs from here on."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _perm(self, n: int) -> np.ndarray:
        return torch.randperm(n, generator=self.generator).numpy()

    def __iter__(self) -> Iterator[int]:
        k = len(self.by_class)
        quotas = np.full(k, self.num_samples // k)
        quotas[self._perm(k)[: self.num_samples % k]] += 1  # the remainder goes to random classes
        picks = []
        for members, quota in zip(self.by_class, quotas):
            reps = -(-quota // len(members))  # ceil
            order = np.concatenate([members[self._perm(len(members))] for _ in range(reps)]) if reps else members[:0]
            picks.append(order[:quota])
        everything = np.concatenate(picks)
        return iter(everything[self._perm(len(everything))].tolist())


def build_sampler(labels: Sequence[int], mode: str = "shuffle", *, seed: int = 0) -> BalancedClassSampler | None:
    """None for `shuffle` (the DataLoader shuffles), a BalancedClassSampler for `balanced`."""
    if mode not in SAMPLERS:
        raise ConfigError(f"dataset.sampler='{mode}' is not valid; choose one of: {', '.join(SAMPLERS)}")
    if mode == "shuffle":
        return None
    sampler = BalancedClassSampler(labels, seed=seed)
    _logger.info("Balanced sampler: %d draws per epoch, %d per class", len(sampler),
                 len(sampler) // len(sampler.by_class))
    return sampler
