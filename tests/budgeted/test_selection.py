"""What auto under a time limit ships (budgeted/selection.py): a challenger replaces the kept model only on a
significant paired gain over the same val images: the fine-tune over the probe, then the ensemble over either."""
from __future__ import annotations

import numpy as np

from pipeline.budgeted.selection import select

LABELS = np.array([0, 1, 2] * 100)


def logits(right: int, first: int = 0, *, sure: float = 5.0, unsure: float = 5.0) -> np.ndarray:
    """Right on images first..first+right-1 (score `sure` on the label), wrong elsewhere (`unsure` on the next
    class)."""
    out = np.zeros((300, 3))
    hit = (np.arange(300) >= first) & (np.arange(300) < first + right)
    out[np.arange(300), np.where(hit, LABELS, (LABELS + 1) % 3)] = np.where(hit, sure, unsure)
    return out


def _select(probe: np.ndarray, finetune: np.ndarray, **kwargs):
    return select((probe, LABELS), (finetune, LABELS), monitor="balanced_accuracy", alpha=0.05,
                  **{"ship_ensemble": True, **kwargs})


def test_the_fine_tune_replaces_the_probe_only_on_a_significant_gain():
    probe = logits(240)
    inside_noise = _select(probe, logits(246, first=20))  # 26 gained, 20 lost
    clear = _select(probe, logits(285))
    assert inside_noise.kept == "probe" and inside_noise.finetune_vs_probe["difference"] > 0
    assert clear.kept == "fine-tune" and "is better than the probe" in clear.why
    assert clear.ensemble["shipped"] is False and set(clear.ensemble) >= {"challenger", "p_not_better"}
    unpaired = select((probe, LABELS), (logits(285)[:-1], LABELS[:-1]), monitor="balanced_accuracy", alpha=0.05,
                      ship_ensemble=True)
    assert unpaired.kept == "probe" and "different val images" in unpaired.why


def test_the_ensemble_ships_where_it_beats_the_kept_model():
    """Each model is right on 70% of val and sure only where right: neither beats the other, but the mean of
    their calibrated probabilities follows the sure one and is right nearly everywhere."""
    probe, finetune = logits(210, sure=5.0, unsure=1.0), logits(210, first=90, sure=5.0, unsure=1.0)
    chosen = _select(probe, finetune)
    assert chosen.kept == "ensemble" and chosen.ensemble["shipped"] and chosen.ensemble["p_not_better"] <= 0.05
    assert "ensemble is better than the probe" in chosen.why and len(chosen.temperatures) == 2
    mixed, labels = chosen.ensemble_val
    assert (mixed.argmax(1) == labels).mean() > 0.95 and np.array_equal(labels, LABELS)


def test_the_ensemble_is_measured_but_not_shipped_when_switched_off_or_not_better():
    probe, finetune = logits(210, sure=5.0, unsure=1.0), logits(210, first=90, sure=5.0, unsure=1.0)
    off = _select(probe, finetune, ship_ensemble=False)
    assert off.kept == "probe" and off.ensemble["better_than_kept"] and not off.ensemble["shipped"]
    same = _select(probe, probe)  # the ensemble of a model with itself adds nothing
    assert same.kept == "probe" and not same.ensemble["better_than_kept"] and not same.ensemble["shipped"]
