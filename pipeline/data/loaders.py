"""Batches for a run: the DataLoaders over its splits, the decoded-image cache, and one timed train batch."""
from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass, field, replace

import torch

from pipeline.config.schema import DatasetConfig, TrainerConfig
from pipeline.data import augment, folder, image_cache, sampler
from pipeline.data.device_decode import DeviceBatches, resolve_decode
from pipeline.runtime import distributed
from pipeline.runtime.seeding import seed_worker

RUNTIME_SKIP_LOG = "skipped_at_runtime.jsonl"  # files that failed in a DataLoader worker, in the run dir


@dataclass(frozen=True)
class LoaderSettings:
    """What the loaders read of the `trainer` and `dataset` groups, and the run's seed."""
    batch_size: int
    eval_batch_size: int
    num_workers: int
    channels_last: bool
    max_pixels: int
    sampler: str
    decode: str
    seed: int

    @classmethod
    def from_groups(cls, trainer: TrainerConfig, dataset: DatasetConfig, seed: int) -> "LoaderSettings":
        return cls(batch_size=trainer.batch_size, eval_batch_size=trainer.eval_batch_size,
                   num_workers=trainer.num_workers, channels_last=trainer.channels_last,
                   max_pixels=dataset.max_pixels, sampler=dataset.sampler, decode=dataset.decode, seed=seed)

    def collate(self):
        return functools.partial(folder.collate_skip_none, channels_last=self.channels_last)


def make_eval_loader(split: folder.Split, eval_tf, settings: LoaderSettings, data_cfg: dict, device: torch.device,
                     *, cache=None, skip_log=None):
    """Val/test batches: preprocessed on the device when `dataset.decode` resolves to gpu (one process), else the
    CPU DataLoader (data/device_decode.py)."""
    if resolve_decode(settings.decode, device) == "gpu" and distributed.world_size() == 1:
        return DeviceBatches(split, data_cfg, device, settings.eval_batch_size, max_pixels=settings.max_pixels,
                             skip_log=skip_log)
    return make_loader(split, eval_tf, settings, train=False, cache=cache, skip_log=skip_log)


def make_loader(split: folder.Split, transform, settings: LoaderSettings, *, train: bool, generator=None,
                cache=None, skip_log=None, targets=None):
    """DataLoader over `split`; `cache` = decoded-image cache, `skip_log` = file listing run-time skips, `targets`
    = a row per sample that the batches carry in place of the labels (distillation's label + teacher logits)."""
    s = settings
    dataset = folder.ImageDataset(split, transform, s.max_pixels, cache=cache, skip_log=skip_log, targets=targets)
    order = sampler.build_sampler(split.labels, s.sampler, seed=s.seed) if train else None
    order = sampler.distributed_sampler(len(dataset), order, train=train, generator=generator,  # (index, seed)
                                        rank=distributed.rank(), world=distributed.world_size())
    if train:  # the workers' base seed from a generator of its own: `generator` gives order and augmentation seeds
        generator = torch.Generator().manual_seed(s.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=distributed.local_batch_size(s.batch_size) if train else s.eval_batch_size,
        sampler=order, drop_last=False, num_workers=s.num_workers, collate_fn=s.collate(),
        generator=generator, worker_init_fn=seed_worker, persistent_workers=s.num_workers > 0,
        pin_memory=torch.cuda.is_available())


def fork_workers_early(loader) -> None:
    """Start a persistent DataLoader's workers now, while the process is small: workers forked after training has
    grown the heap share its pages copy-on-write, and the next train step then copies them (8-10 s on 2 cores)."""
    if isinstance(loader, torch.utils.data.DataLoader) and loader.persistent_workers:
        iter(loader)


def build_image_cache(dataset: DatasetConfig, splits: folder.DatasetSplits, data_cfg: dict, *, repeated: bool):
    """`dataset.cache`: decoded images at the short side the eval resize needs (None when off). `repeated`: the
    images are read every epoch (fine-tuning), which is when `auto` caches them. Returns (cache, resolved mode)."""
    d = dataset
    paths = [p for split in (splits.train, splits.val, splits.test) if split is not None for p in split.paths]
    short_side, workers = augment.eval_resize_size(data_cfg), max(1, torch.get_num_threads())
    mode = d.cache if d.cache != "auto" else image_cache.resolve_auto(
        paths, short_side, repeated=repeated, ram_fraction=d.cache_ram_fraction, workers=workers)
    return image_cache.build_cache(mode, paths=paths, short_side=short_side, interpolation=data_cfg["interpolation"],
                                   max_pixels=d.max_pixels, cache_dir=d.cache_dir, workers=workers), mode


def timed_train_batch(splits: folder.DatasetSplits, train_tf, settings: LoaderSettings, cache=None):
    """(one train batch (images, labels), the loader's seconds per image, decode and augmentation included), or
    None where no image of the batch decodes: what the time-budget plan times a train step on."""
    dataset = folder.ImageDataset(splits.train, train_tf, settings.max_pixels, cache=cache)
    n = min(distributed.local_batch_size(settings.batch_size), len(splits.train))
    begin = time.perf_counter()
    batch = folder.collate_skip_none([dataset[i] for i in range(n)], channels_last=settings.channels_last)
    return None if batch is None else ((batch[0], batch[1]), (time.perf_counter() - begin) / max(len(batch[1]), 1))


@dataclass
class TrainingData:
    """A run's images after the audit: the splits, their transforms and preprocessing, how batches are made, and
    how files are read (the decoded-image cache, the run-time skip log; set once the cache is built)."""
    splits: folder.DatasetSplits
    train_tf: object
    eval_tf: object
    data_cfg: dict
    settings: LoaderSettings
    cache: object = None
    skip_log: object = None
    train_targets: object = None  # distillation: (label, teacher logits) rows of the train split (training/distill.py)
    made: list = field(default_factory=list)  # the loaders made here, whose workers `close` stops

    def train_loader(self, generator=None):
        return self._keep(make_loader(self.splits.train, self.train_tf, self.settings, train=True,
                                      generator=generator, cache=self.cache, skip_log=self.skip_log,
                                      targets=self.train_targets))

    def eval_loader(self, split: folder.Split, device: torch.device):
        return self._keep(make_eval_loader(split, self.eval_tf, self.settings, self.data_cfg, device,
                                           cache=self.cache, skip_log=self.skip_log))

    def _keep(self, loader):
        self.made.append(weakref.ref(loader))
        return loader

    def close(self) -> None:
        """Stop the persistent workers of every loader made here that is still alive. Left to interpreter exit,
        such a loader (they end up in reference cycles) hangs it: its workers ignore SIGTERM (runtime/seeding.py),
        so multiprocessing's exit handler waits on them, and a garbage collection shuts them down only after a
        5 s timeout per worker."""
        for ref in self.made:
            iterator = getattr(ref(), "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()  # torch's own shutdown, as the iterator's __del__ calls it
        self.made.clear()

    def end_training(self) -> None:
        """The training loop is over: stop the persistent workers, and read the passes still to come (calibration,
        test, leaked copies, storage invariance) in this process. A DataLoader worker forked from the heap training
        grew costs seconds in copy-on-write page faults (hymenoptera, 2 cores: test 49 images 9.1 s with workers,
        0.7 s without; the invariance check 24.5 s against 5.6 s), more than it saves on a pass of a few hundred
        images."""
        self.close()
        self.settings = replace(self.settings, num_workers=0)

    def image_pass(self, split: folder.Split, transform, *, seed: int | None = None):
        """One ordered pass over `split` in eval-size batches; `seed`: the per-image augmentation seeds drawn in
        a fixed order from a generator of that seed (training/boundary.py's augmented views)."""
        s = self.settings
        dataset = folder.ImageDataset(split, transform, s.max_pixels, cache=self.cache, skip_log=self.skip_log)
        order = None if seed is None else sampler.SeededSampler(
            torch.utils.data.SequentialSampler(range(len(dataset))), torch.Generator().manual_seed(seed))
        return torch.utils.data.DataLoader(dataset, batch_size=s.eval_batch_size, sampler=order,
                                           num_workers=s.num_workers, collate_fn=s.collate(),
                                           worker_init_fn=seed_worker)
