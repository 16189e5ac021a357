"""Train-set sampling: plain shuffle, or a class-balanced sampler (`dataset.sampler`)."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import ConfigError

_logger = logging.getLogger(__name__)


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
    if mode == "shuffle":
        return None
    sampler = BalancedClassSampler(labels, seed=seed)
    _logger.info("Balanced sampler: %d draws per epoch, %d per class", len(sampler),
                 len(sampler) // len(sampler.by_class))
    return sampler


class ShardSampler(torch.utils.data.Sampler[int]):
    """One rank's share of a global order that every rank draws identically (same seed, same generator).

    The order is padded to a multiple of `world` by repeating its start (as torch's DistributedSampler
    does) and rank r takes every world-th index from r. With a per-rank batch of B/world, global batch b
    (all ranks together) is items b*B..(b+1)*B of the order: the batches of a one-process run with batch B.
    The base sampler's generator advances each epoch on every rank alike, so no set_epoch is needed, and
    its state (resume) is the base's."""

    def __init__(self, base: Sequence[int] | torch.utils.data.Sampler, rank: int, world: int):
        self.base, self.rank, self.world = base, rank, world

    def __len__(self) -> int:
        return -(-len(self.base) // self.world)

    def __iter__(self) -> Iterator[int]:
        order = list(iter(self.base))
        if order and len(order) % self.world:
            pad = self.world - len(order) % self.world
            order += (order * (pad // len(order) + 1))[:pad]
        return iter(order[self.rank::self.world])

    def state_dict(self) -> dict | None:
        return self.base.state_dict() if hasattr(self.base, "state_dict") else None

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)


class EvalShardSampler(torch.utils.data.Sampler[int]):
    """Contiguous block `rank` of range(n), no padding: the ranks' outputs concatenated in rank order are
    every sample exactly once, in the original order (exact val/test metrics)."""

    def __init__(self, n: int, rank: int, world: int):
        self.start, self.stop = n * rank // world, n * (rank + 1) // world

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))


def distributed_sampler(n: int, order: torch.utils.data.Sampler | None, *, train: bool, generator=None,
                        rank: int, world: int) -> torch.utils.data.Sampler | None:
    """The sampler of one rank: train = its ShardSampler of `order` (None = a seeded shuffle drawn from
    `generator`, exactly what DataLoader(shuffle=True, generator=...) draws); eval = an EvalShardSampler."""
    if world <= 1:
        return order
    if not train:
        return EvalShardSampler(n, rank, world)
    base = order if order is not None else torch.utils.data.RandomSampler(range(n), generator=generator)
    return ShardSampler(base, rank, world)
