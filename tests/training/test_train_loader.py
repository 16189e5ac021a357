"""The train loader: its workers persist across epochs (workers re-forked from a process that training has grown
share its heap copy-on-write, and the next step copies it: 8-17 s per epoch on 2 cores, make bench), and each
image's augmentation comes from a seed drawn in the main process (sampler.SeededSampler), so the batches do not
depend on the worker count, on persistence, or on a resume that restores the generator."""
from __future__ import annotations

import torch

from pipeline.data import augment
from pipeline.data.folder import SplitLayout, load_imagefolder
from pipeline.data.loaders import LoaderSettings, TrainingData, make_loader
from pipeline.data.sampler import SeededSampler

DATA_CFG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
            "crop_pct": 1.0, "crop_mode": "center"}


def _loader(tiny_folder, cfg_factory, workers: int):
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "augment=medium", "trainer.batch_size=8",
                      f"trainer.num_workers={workers}")
    splits = load_imagefolder(tiny_folder, SplitLayout(val_fraction=0.25), seed=0)
    transform = augment.build_train_transform(DATA_CFG, augment.TrainAugment.from_group(cfg.augment))
    settings = LoaderSettings.from_groups(cfg.trainer, cfg.dataset, cfg.seed)
    return make_loader(splits.train, transform, settings, train=True, generator=torch.Generator().manual_seed(3))


def _epochs(loader, n: int = 2) -> list[list[torch.Tensor]]:
    return [[x.clone() for x, _ in loader] for _ in range(n)]


def test_augmented_batches_are_the_same_with_0_or_2_workers(tiny_folder, cfg_factory):
    serial, parallel = (_epochs(_loader(tiny_folder, cfg_factory, w)) for w in (0, 2))
    assert all(torch.equal(a, b) for e1, e2 in zip(serial, parallel, strict=True) for a, b in zip(e1, e2, strict=True))
    assert not torch.equal(serial[0][0], serial[1][0])  # epochs draw new orders and augmentations


def test_train_workers_persist_across_epochs(tiny_folder, cfg_factory):
    loader = _loader(tiny_folder, cfg_factory, 2)
    pids = []
    for _ in range(2):
        list(loader)
        pids.append([w.pid for w in loader._iterator._workers])
    assert loader.persistent_workers and pids[0] == pids[1]


def test_a_restored_generator_replays_order_and_seeds():
    base_gen = torch.Generator().manual_seed(0)
    sampler = SeededSampler(torch.utils.data.RandomSampler(range(10), generator=base_gen), base_gen)
    state = sampler.state_dict()
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and len({s for _, s in first}) == 10
    sampler.load_state_dict(state)
    assert list(sampler) == first and list(sampler) != first


def test_after_training_the_workers_stop_and_later_passes_read_in_process(tiny_folder, cfg_factory):
    """TrainingData.end_training: a worker forked from the heap training grew costs more than a short pass saves
    (hymenoptera: the test pass 9.1 s with 2 workers, 0.7 s without), so the passes after the loop read here."""
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "trainer.num_workers=2")
    splits = load_imagefolder(tiny_folder, SplitLayout(val_fraction=0.25), seed=0)
    data = TrainingData(splits, augment.build_eval_transform(DATA_CFG), augment.build_eval_transform(DATA_CFG),
                        DATA_CFG, LoaderSettings.from_groups(cfg.trainer, cfg.dataset, cfg.seed))
    train = data.train_loader(torch.Generator().manual_seed(0))
    list(train)
    workers = list(train._iterator._workers)
    assert all(w.is_alive() for w in workers)
    data.end_training()
    assert not any(w.is_alive() for w in workers)
    later = data.eval_loader(splits.val, torch.device("cpu"))
    assert later.num_workers == 0 and len(list(later)) > 0
