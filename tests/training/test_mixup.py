"""Mixup / CutMix (training/mixing.py) and the soft-target losses they need (training/loss.py)."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from conftest import make_imagefolder
from pipeline.train import train
from pipeline.training import loop, loss, mixing
from pipeline.training.loss import FocalLoss, build_loss


def _augment(**knobs) -> DictConfig:
    return OmegaConf.create({"mixup": 0.0, "cutmix": 0.0, "mix_prob": 1.0, **knobs})


@pytest.mark.parametrize("name", ["ce", "focal"])
def test_soft_target_loss_on_one_hot_rows_equals_the_hard_label_loss(name):
    """Under mixing the train loss takes (N, K) targets; one-hot rows give exactly the hard-label loss: torch's
    CrossEntropyLoss for `ce` (same class weights and label smoothing), the focal loss of the indices for `focal`."""
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 3) * 3, torch.randint(0, 3, (16,))
    for weights in (None, torch.tensor([3.0, 1.0, 0.5])):
        for smoothing in (0.0, 0.1):
            soft = build_loss(name=name, class_weights=weights, label_smoothing=smoothing, soft_targets=True)
            hard = build_loss(name=name, class_weights=weights, label_smoothing=smoothing)
            assert isinstance(soft, FocalLoss) and soft.gamma == (2.0 if name == "focal" else 0.0)
            expected = hard(logits, labels)
            if name == "ce":
                assert isinstance(hard, torch.nn.CrossEntropyLoss)
                torch.testing.assert_close(expected, F.cross_entropy(logits, labels, weight=weights,
                                                                     label_smoothing=smoothing))
            torch.testing.assert_close(soft(logits, F.one_hot(labels, 3).float()), expected)
            torch.testing.assert_close(soft(logits, labels), expected)


def test_weighted_soft_target_ce_is_the_weighted_mix_of_the_two_labels_losses():
    """-sum_c w_c t_c log p_c over the batch's sum_c w_c t_c: with t = lam*y1 + (1-lam)*y2 that is the
    weight-mass-weighted mean of the two hard-label losses (no smoothing), and plain lam-mixing without weights."""
    torch.manual_seed(1)
    logits, y1, y2, lam = torch.randn(8, 4), torch.randint(0, 4, (8,)), torch.randint(0, 4, (8,)), 0.3
    t = lam * F.one_hot(y1, 4).float() + (1 - lam) * F.one_hot(y2, 4).float()
    w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    nll = lambda y: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    expected = (lam * w[y1] * nll(y1) + (1 - lam) * w[y2] * nll(y2)).sum() / (lam * w[y1] + (1 - lam) * w[y2]).sum()
    torch.testing.assert_close(build_loss(class_weights=w, soft_targets=True)(logits, t), expected)
    torch.testing.assert_close(build_loss(soft_targets=True)(logits, t),
                               lam * nll(y1).mean() + (1 - lam) * nll(y2).mean())


def test_mixup_mixes_pairs_and_an_odd_batch_keeps_its_last_sample():
    """timm pairs i with n-1-i: images lam*x_i + (1-lam)*x_(n-1-i), targets likewise; an odd batch mixes its
    first n-1 samples (timm needs an even batch) and keeps the last image and its one-hot target."""
    np.random.seed(0)
    mixer = mixing.BatchMixer(mixup=0.2, cutmix=0.0, mix_prob=1.0, num_classes=3)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 2, 1])
    out, t = mixer(x.clone(), y)
    assert out.shape == x.shape and t.shape == (5, 3) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(5))
    assert torch.equal(out[4], x[4]) and torch.equal(t[4], torch.tensor([0.0, 1.0, 0.0]))
    lam = float(t[0, 0])
    assert 0 < lam < 1 and float(t[0, 2]) == pytest.approx(1 - lam)
    torch.testing.assert_close(out[:4], lam * x[:4] + (1 - lam) * x[:4].flip(0))
    single, t1 = mixer(x[:1].clone(), y[:1])  # nothing to pair with
    assert torch.equal(single, x[:1]) and torch.equal(t1, torch.tensor([[1.0, 0.0, 0.0]]))


def test_cutmix_pastes_a_box_whose_area_is_the_target_share_and_both_alternate():
    np.random.seed(0)
    x, y = torch.arange(4.0)[:, None, None, None].expand(4, 3, 32, 32).clone(), torch.tensor([0, 1, 2, 0])
    out, t = mixing.BatchMixer(mixup=0.0, cutmix=1.0, mix_prob=1.0, num_classes=3)(x.clone(), y)
    pasted = (out[1] != x[1]).float().mean()  # image 1 holds a box of image 2
    assert 0 < pasted < 1 and torch.all((out[1] == 1) | (out[1] == 2))
    assert float(t[1, 2]) == pytest.approx(float(pasted)) and float(t[1, 1]) == pytest.approx(1 - float(pasted))
    both = mixing.BatchMixer(mixup=1.0, cutmix=1.0, mix_prob=1.0, num_classes=3)
    kinds = set()
    for _ in range(20):
        mixed, _ = both(x.clone(), y)
        kinds.add("cutmix" if torch.all((mixed[1] == 1) | (mixed[1] == 2)) else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_mixer_is_off_without_an_alpha_or_probability_and_mix_prob_skips_batches(caplog):
    assert mixing.build_mixer(_augment(mix_prob=0.5), 3) is None  # both alphas 0: off, no error
    with caplog.at_level(logging.INFO, logger="pipeline.training.mixing"):
        assert mixing.build_mixer(_augment(cutmix=1.0, mix_prob=0.0), 3) is None
        mixing.log_cached_probe_ignores_mixing(_augment(mixup=0.2))
    assert "mix_prob=0: mixup/cutmix off" in caplog.text and "apply to fine-tuning only" in caplog.text
    np.random.seed(0)
    half = mixing.build_mixer(_augment(mixup=1.0, mix_prob=0.5), 3)
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
    mixed = [not torch.equal(half(x.clone(), y)[0], x) for _ in range(40)]
    assert 10 < sum(mixed) < 30


def test_mixup_reaches_the_training_step_with_class_weights_and_the_balanced_sampler(tmp_path, cfg_factory,
                                                                                     monkeypatch):
    """A real fine-tune run (augment.mixup=0.2, balanced class weights, balanced sampler, label smoothing, an odd
    last batch): every step gets soft targets and images mixed as the targets say; the train loss is the weighted
    soft-target CE that smooths; the eval loss stays torch's hard-label CE. Fails if mixing is silently off."""
    root = make_imagefolder(tmp_path / "data3", {"blue": 12, "green": 6, "red": 3})
    make_imagefolder(root, {"blue": 3, "green": 3, "red": 3}, "val", offset=500)
    mixer_inputs, steps, losses = [], [], {}
    real_call, real_step, real_build = mixing.BatchMixer.__call__, loop._step, loss.build_losses

    def spy_call(self, images, labels):
        mixer_inputs.append((images.clone(), labels.clone()))
        return real_call(self, images, labels)

    def spy_step(model, images, targets, *args, **kwargs):
        steps.append((images.detach().clone(), targets.clone()))
        return real_step(model, images, targets, *args, **kwargs)

    def spy_build(*args, **kwargs):
        losses["train"], losses["eval"] = real_build(*args, **kwargs)
        return losses["train"], losses["eval"]

    monkeypatch.setattr(mixing.BatchMixer, "__call__", spy_call)
    monkeypatch.setattr(loop, "_step", spy_step)
    monkeypatch.setattr(loss, "build_losses", spy_build)
    cfg = cfg_factory("dataset=folder", f"dataset.root={root}", "backbone=tiny", "backbone.input_size=64",
                      "strategy=finetune", "augment.mixup=0.2", "loss.class_weights=balanced",
                      "dataset.sampler=balanced", "loss.label_smoothing=0.1", "trainer.batch_size=8",
                      "trainer.max_train_batches=0", "optim.lr=0.01")
    metrics = train(cfg)
    assert metrics["status"] == "ok" and math.isfinite(metrics["history"][0]["train_loss"])
    train_loss, eval_loss = losses["train"], losses["eval"]
    assert isinstance(train_loss, FocalLoss) and train_loss.gamma == 0 and train_loss.label_smoothing == 0.1
    torch.testing.assert_close(train_loss.weight, torch.tensor([21 / 36, 21 / 18, 21 / 9]))  # blue, green, red
    assert isinstance(eval_loss, torch.nn.CrossEntropyLoss) and eval_loss.label_smoothing == 0.0
    assert len(steps) == len(mixer_inputs) == 3 and [len(t) for _, t in steps] == [8, 8, 5]  # 21 draws, batch 8
    soft_rows = 0
    for (x, y), (images, targets) in zip(mixer_inputs, steps):
        assert targets.shape == (len(y), 3) and targets.min() == 0  # unsmoothed: the loss smooths
        torch.testing.assert_close(targets.sum(1), torch.ones(len(y)))
        even = len(y) - len(y) % 2
        pair = torch.arange(even).flip(0)
        lam = targets[torch.arange(even), y[:even]]  # same lam per batch where the pair's labels differ
        lam = float(lam[y[:even] != y[pair]].min()) if bool((y[:even] != y[pair]).any()) else 1.0
        torch.testing.assert_close(images[:even], lam * x[:even] + (1 - lam) * x[:even][pair])
        torch.testing.assert_close(images[even:], x[even:])
        soft_rows += int((targets.max(1).values < 1).sum())
    assert soft_rows > 0
