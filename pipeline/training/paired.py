"""Two models compared on the same val images: a paired bootstrap of the `trainer.monitor` difference.

Each draw resamples the val images with replacement (the same images for both models), so what the two get
right or wrong on the same image cancels and only their difference varies. `paired_test` gives the observed
difference (positive: `challenger` better on the monitor, lower loss included), its 90% interval and the share
of draws where the challenger is not better: a one-sided p-value. `mean_probabilities` is the candidate that
averages two models' temperature-calibrated probabilities (training/calibration.py fit_temperature).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.config import MONITORS
from pipeline.training.calibration import fit_temperature

DRAWS = 2000
CHUNK = 250  # draws per weight matrix (CHUNK x images int32)


@dataclass
class PairedTest:
    monitor: str
    incumbent: float
    challenger: float
    difference: float  # challenger - incumbent, signed so that > 0 is better (loss: incumbent - challenger)
    low: float  # 5th percentile of the bootstrap difference
    high: float  # 95th percentile
    p_not_better: float  # share of draws with difference <= 0
    draws: int

    def better(self, alpha: float) -> bool:
        """The challenger is better by the test at one-sided level `alpha`."""
        return self.difference > 0 and self.p_not_better <= alpha

    def record(self) -> dict:
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def weighted_scores(weights: np.ndarray, labels: np.ndarray, logits: np.ndarray, monitor: str) -> np.ndarray:
    """The monitor under each row of `weights` (draws x images, counts of each image in a resample)."""
    preds, w = logits.argmax(1), weights.astype(np.float64)
    if monitor == "loss":
        nll = -_log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels]
        return w @ nll / w.sum(1)
    if monitor == "accuracy":
        return w @ (preds == labels) / w.sum(1)
    per_class = []
    for c in np.unique(labels):
        if monitor == "balanced_accuracy":
            n = w @ (labels == c)
            per_class.append(np.where(n > 0, w @ ((labels == c) & (preds == c)) / np.maximum(n, 1e-12), np.nan))
        else:  # macro_f1
            tp, fp, fn = (w @ ((labels == c) & (preds == c)), w @ ((labels != c) & (preds == c)),
                          w @ ((labels == c) & (preds != c)))
            per_class.append(2 * tp / np.maximum(2 * tp + fp + fn, 1e-12))
    return np.nanmean(np.stack(per_class), axis=0)


def paired_test(labels: np.ndarray, incumbent: np.ndarray, challenger: np.ndarray, monitor: str, *,
                draws: int = DRAWS, seed: int = 0) -> PairedTest:
    """Paired bootstrap of challenger - incumbent on `monitor` over the same val images (logits of each)."""
    if monitor not in MONITORS:
        raise ValueError(f"unknown monitor {monitor!r}")
    labels = np.asarray(labels)
    incumbent, challenger = np.asarray(incumbent, np.float64), np.asarray(challenger, np.float64)
    sign = -1.0 if MONITORS[monitor] == "min" else 1.0
    ones = np.ones((1, len(labels)))
    observed = [float(weighted_scores(ones, labels, x, monitor)[0]) for x in (incumbent, challenger)]
    rng, diffs = np.random.default_rng(seed), []
    for start in range(0, draws, CHUNK):
        w = rng.multinomial(len(labels), np.full(len(labels), 1 / len(labels)), size=min(CHUNK, draws - start))
        w = w.astype(np.int32)
        diffs.append(sign * (weighted_scores(w, labels, challenger, monitor)
                             - weighted_scores(w, labels, incumbent, monitor)))
    d = np.concatenate(diffs)
    return PairedTest(monitor, observed[0], observed[1], sign * (observed[1] - observed[0]),
                      float(np.percentile(d, 5)), float(np.percentile(d, 95)), float(np.mean(d <= 0)), draws)


def mean_probabilities(labels: np.ndarray, *logits: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """(log of the mean of each model's probabilities at its own val-fitted temperature: the ensemble's logits, as
    model/ensemble.py computes them; those temperatures)."""
    temperatures = [fit_temperature(np.asarray(x), labels) for x in logits]
    probs = [np.exp(_log_softmax(np.asarray(x, np.float64) / t)) for x, t in zip(logits, temperatures)]
    return np.log(np.maximum(np.mean(probs, axis=0), 1e-12)).astype(np.float32), temperatures
