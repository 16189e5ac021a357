"""Train-set sampling: plain shuffle, or a class-balanced sampler (`dataset.sampler`); one augmentation seed per
sample (SeededSampler)."""
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
    """The sampler of one rank. Train: `order` (None = a shuffle drawn from `generator`) with an augmentation
    seed per sample (SeededSampler), sharded by ShardSampler under torchrun. Eval: None, or an EvalShardSampler."""
    if not train:
        return EvalShardSampler(n, rank, world) if world > 1 else None
    base = order if order is not None else torch.utils.data.RandomSampler(range(n), generator=generator)
    seeded = SeededSampler(base, generator)
    return ShardSampler(seeded, rank, world) if world > 1 else seeded


class SeededSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """The train order with one augmentation seed per sample: yields (index, seed) for ImageDataset.

    The seeds are drawn in the main process from `generator` at each epoch's start, so an image's augmentation does
    not depend on which worker loads it, on the worker count, or on workers persisting across epochs (the train
    loader keeps its workers: re-forking them from a grown process cost 8-17 s per epoch, make bench); a resume
    that restores `generator` (state_dict) replays them exactly. Under torchrun it seeds the global order before
    ShardSampler splits it, so every sample gets the seed it gets in a one-process run."""

    def __init__(self, base: torch.utils.data.Sampler, generator: torch.Generator | None):
        self.base, self.generator = base, generator

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self.base)
        seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=self.generator).tolist()
        return zip(order, seeds)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state() if self.generator is not None else None,
                "base": self.base.state_dict() if hasattr(self.base, "state_dict") else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        if state.get("base") is not None and hasattr(self.base, "load_state_dict"):
            self.base.load_state_dict(state["base"])
