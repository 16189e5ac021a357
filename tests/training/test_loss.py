"""Class weights, focal loss and the prior-bias head init."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from pipeline.errors import ConfigError
from pipeline.model.backbone import build_backbone
from pipeline.training.loss import (
    build_loss,
    compute_class_weights,
    effective_prior,
    init_prior_bias,
    label_entropy,
    plan_imbalance,
    resolve_prior_bias,
)

COUNTS = [10, 30, 60]
NAMES = ["a", "b", "c"]


def test_balanced_weights_match_sklearn_on_known_counts():
    y = np.repeat([0, 1, 2], COUNTS)
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=y)
    got = compute_class_weights(COUNTS, "balanced")
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(got, [100 / (3 * 10), 100 / (3 * 30), 100 / (3 * 60)])  # n / (K * n_c)


def test_effective_number_weights_follow_cui_et_al():
    beta = 0.99
    got = compute_class_weights(COUNTS, "effective", beta=beta)
    raw = np.array([(1 - beta) / (1 - beta ** n) for n in COUNTS])
    np.testing.assert_allclose(got, raw * 3 / raw.sum())
    assert got.sum() == pytest.approx(3.0) and got[0] > got[1] > got[2]
    np.testing.assert_allclose(compute_class_weights(COUNTS, "effective", beta=0.0), [1, 1, 1])  # beta 0: no reweight
    balanced = compute_class_weights(COUNTS, "balanced")
    assert got[0] / got[2] < balanced[0] / balanced[2]  # softer than inverse frequency


def test_explicit_mapping_none_and_bad_values():
    np.testing.assert_allclose(compute_class_weights(COUNTS, {"c": 0.5, "a": 2}, class_names=NAMES), [2, 1, 0.5])
    np.testing.assert_allclose(compute_class_weights(COUNTS, "none"), [1, 1, 1])
    with pytest.raises(ConfigError, match="unknown class.*'z'.*a, b, c"):
        compute_class_weights(COUNTS, {"z": 1.0}, class_names=NAMES)
    with pytest.raises(ConfigError, match=">= 0"):
        compute_class_weights(COUNTS, {"a": -1.0}, class_names=NAMES)


def test_focal_with_gamma_zero_is_weighted_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 3), torch.randint(0, 3, (16,))
    w = torch.tensor([3.0, 1.0, 0.5])
    for smoothing in (0.0, 0.1):
        focal = build_loss(name="focal", gamma=0.0, class_weights=w, label_smoothing=smoothing)
        ce = build_loss(name="ce", class_weights=w, label_smoothing=smoothing)
        torch.testing.assert_close(focal(logits, target), ce(logits, target))


def test_focal_down_weights_easy_examples():
    logits, target = torch.tensor([[4.0, 0.0], [0.2, 0.0]]), torch.tensor([0, 0])
    per_ce = F.cross_entropy(logits, target, reduction="none")
    focal = build_loss(name="focal", gamma=2.0)
    easy, hard = (focal(logits[i:i + 1], target[i:i + 1]) for i in range(2))
    assert easy / per_ce[0] < 0.01 and hard / per_ce[1] > 0.2  # (1-p)^2: p=0.98 vs p=0.55


def test_prior_bias_auto_threshold_and_values():
    assert resolve_prior_bias("auto", [1341, 3875]) is False  # chest_xray: ratio 2.9
    assert resolve_prior_bias("auto", [100, 401]) is True
    assert resolve_prior_bias(True, [1, 1]) is True and resolve_prior_bias("false", [1, 100]) is False
    np.testing.assert_allclose(effective_prior(COUNTS, np.ones(3)), [0.1, 0.3, 0.6])
    balanced = compute_class_weights(COUNTS, "balanced")
    np.testing.assert_allclose(effective_prior(COUNTS, balanced), [1 / 3] * 3)  # weights cancel the imbalance
    np.testing.assert_allclose(effective_prior(COUNTS, np.ones(3), sampler="balanced"), [1 / 3] * 3)


def test_prior_bias_makes_untrained_model_predict_class_frequencies():
    model, _ = build_backbone(name="test_efficientnet", num_classes=3, weights="none")
    plan = plan_imbalance(COUNTS, NAMES, prior_bias="true")
    assert plan["prior_bias"]["enabled"]
    init_prior_bias(model, list(plan["prior_bias"]["prior"].values()))
    torch.manual_seed(0)
    x = torch.randn(32, 3, 64, 64)
    with torch.no_grad():
        logits = model.eval()(x)
    mean_prob = logits.softmax(1).mean(0).numpy()
    np.testing.assert_allclose(mean_prob, np.array(COUNTS) / sum(COUNTS), atol=1e-3)
    labels = torch.from_numpy(np.repeat([0, 1, 2], COUNTS))
    expected_loss = F.cross_entropy(logits[:1].expand(len(labels), -1), labels)  # same prediction for all
    assert float(expected_loss) == pytest.approx(label_entropy([0.1, 0.3, 0.6]), abs=1e-3)
    assert label_entropy([0.1, 0.3, 0.6]) < np.log(3)


def test_plan_records_weights_and_initial_loss():
    plan = plan_imbalance(COUNTS, NAMES, class_weights="balanced", prior_bias="auto")
    assert plan["imbalance_ratio"] == pytest.approx(6.0) and plan["prior_bias"]["enabled"]
    assert plan["weights"]["a"] == pytest.approx(100 / 30) and plan["train_counts"] == dict(zip(NAMES, COUNTS))
    assert plan["prior_bias"]["initial_loss"] == pytest.approx(np.log(3))  # balanced weights: uniform prior
