"""The class-balanced train sampler and its wiring into the train loader."""
from __future__ import annotations

from collections import Counter

import numpy as np

from conftest import make_imagefolder
from pipeline.data.augment import build_eval_transform
from pipeline.data.folder import SplitLayout, load_imagefolder
from pipeline.data.loaders import LoaderSettings, make_loader
from pipeline.data.sampler import BalancedClassSampler, build_sampler

LABELS = [0] * 10 + [1] * 100 + [2] * 1000  # 1:10:100


def test_balanced_sampler_epoch_histogram_is_uniform():
    sampler = build_sampler(LABELS, "balanced", seed=0)
    for _ in range(3):  # several epochs
        drawn = list(sampler)
        assert len(drawn) == len(LABELS) == len(sampler)
        hist = Counter(LABELS[i] for i in drawn)
        expected = len(LABELS) / 3
        assert all(abs(hist[c] - expected) <= 0.1 * expected for c in range(3)), hist
        assert max(hist.values()) - min(hist.values()) <= 1  # exact quotas, not just in expectation


def test_balanced_sampler_covers_minority_and_does_not_repeat_majority():
    drawn = list(BalancedClassSampler(LABELS, seed=1))
    minority = Counter(i for i in drawn if LABELS[i] == 0)
    assert set(minority) == set(range(10)) and max(minority.values()) - min(minority.values()) <= 1
    majority = [i for i in drawn if LABELS[i] == 2]
    assert len(set(majority)) == len(majority)  # 370 of 1000 drawn without repeats


def test_balanced_sampler_is_seeded_and_epochs_differ():
    a, b = BalancedClassSampler(LABELS, seed=7), BalancedClassSampler(LABELS, seed=7)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b and list(a) != first_a
    assert list(BalancedClassSampler(LABELS, seed=8)) != first_a


def test_shuffle_is_a_plain_dataloader_shuffle():
    assert build_sampler(LABELS, "shuffle") is None


def test_train_loader_uses_balanced_sampler(tmp_path, cfg_factory):
    root = make_imagefolder(tmp_path / "imb", {"blue": 4, "green": 20})
    splits = load_imagefolder(root, SplitLayout(val_fraction=0.25), seed=0)
    cfg = cfg_factory("dataset=folder", f"dataset.root={root}", "dataset.sampler=balanced", "trainer.batch_size=6")
    transform = build_eval_transform({"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3,
                                      "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"})
    loader = make_loader(splits.train, transform, LoaderSettings.from_groups(cfg.trainer, cfg.dataset, cfg.seed),
                         train=True)
    labels = np.concatenate([y.numpy() for _, y in loader])
    assert len(labels) == len(splits.train) and abs(int((labels == 0).sum()) - len(labels) / 2) <= 1
    assert Counter(splits.train.labels)[0] < len(splits.train) / 4  # the split itself is imbalanced
