"""The paired bootstrap (training/paired.py) that decides whether a fine-tune replaces auto's probe."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.training import paired


def _logits(labels: np.ndarray, right: np.ndarray, classes: int = 2) -> np.ndarray:
    """One-hot-ish logits: the label where `right`, the next class elsewhere."""
    pred = np.where(right, labels, (labels + 1) % classes)
    out = np.zeros((len(labels), classes))
    out[np.arange(len(labels)), pred] = 4.0
    return out


LABELS = np.array([0, 1] * 100)


def test_a_model_against_itself_is_never_better():
    x = _logits(LABELS, np.arange(200) % 3 > 0)
    test = paired.paired_test(LABELS, x, x, "balanced_accuracy")
    assert test.difference == 0 and test.p_not_better == 1.0 and not test.better(0.05)


def test_a_clear_gain_is_better_and_a_gain_inside_the_noise_is_not():
    probe = _logits(LABELS, np.arange(200) < 150)  # 150 of 200 right
    small = _logits(LABELS, (np.arange(200) >= 10) & (np.arange(200) < 163))  # 153 right: 13 gained, 10 lost
    large = _logits(LABELS, np.arange(200) < 185)
    assert paired.paired_test(LABELS, probe, large, "accuracy").better(0.05)
    test = paired.paired_test(LABELS, probe, small, "accuracy")
    assert test.difference == pytest.approx(0.015) and not test.better(0.05) and test.low < 0 < test.high


@pytest.mark.parametrize("monitor", ["balanced_accuracy", "macro_f1", "loss"])
def test_every_monitor_points_better_upwards(monitor):
    worse, better = _logits(LABELS, np.arange(200) < 120), _logits(LABELS, np.arange(200) < 190)
    assert paired.paired_test(LABELS, worse, better, monitor).better(0.05)
    assert paired.paired_test(LABELS, better, worse, monitor).difference < 0


def test_the_observed_scores_are_the_plain_metric():
    x = _logits(LABELS, np.arange(200) < 150)
    test = paired.paired_test(LABELS, x, x, "accuracy")
    assert test.incumbent == test.challenger == pytest.approx(0.75)


def test_the_ensemble_averages_calibrated_probabilities():
    a, b = _logits(LABELS, np.arange(200) < 150), _logits(LABELS, np.arange(200) >= 50)
    mixed, temperatures = paired.mean_probabilities(LABELS, a, b)
    assert len(temperatures) == 2 and all(t > 0 for t in temperatures)
    assert mixed.shape == a.shape and np.allclose(np.exp(mixed).sum(1), 1.0, atol=1e-5)
