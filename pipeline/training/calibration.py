"""Test-time augmentation and temperature scaling, decided on val after training (`trainer.tta`,
`trainer.calibrate`).

`calibrate_run` runs between the fit and the test evaluation: it decides whether the mirrored view helps
(`decide_tta`), fits a temperature on the val logits of the model that will ship (`fit_temperature`) and
writes both into best.json (`tta`, `temperature`), from where model/calibrated.py applies them in the test
evaluation, `pipeline.load`, predict and every exported format. `calibration_metrics` measures the result
(ECE, NLL, Brier); `reliability_bins` is what the reliability diagram (reports/plots.py) draws.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from pipeline.config.schema import TrainerConfig
from pipeline.model import checkpoint
from pipeline.model.calibrated import PLAIN, VIEWS, apply_view
from pipeline.runtime import distributed
from pipeline.training import loop
from pipeline.training.metrics import classification_metrics, monitor_direction

_logger = logging.getLogger(__name__)

T_RANGE = (0.05, 20.0)  # fitted temperatures are clamped to this range (tiny or separable val sets)
N_BINS = 15
TTA_VIEWS = list(VIEWS)  # identity + hflip: the views trainer.tta=flip adds


def _log_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature)."""
    labels = np.asarray(labels, np.int64)
    return float(-_log_probs(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T), clamped to `T_RANGE`; 1.0 without samples.

    NLL is convex in 1/T, hence unimodal in log T: a bounded scalar search finds the optimum on any val set,
    and a separable one (NLL falls all the way to T -> 0) ends at the range's low end instead of diverging."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    if not len(labels) or not np.isfinite(logits).all():
        _logger.warning("Temperature not fitted (%s): T = 1", "no val samples" if not len(labels) else
                        "non-finite val logits")
        return 1.0
    low, high = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    found = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)), bounds=(low, high),
                            method="bounded", options={"xatol": 1e-6})
    best = min((found.x, low, high), key=lambda log_t: nll(logits, labels, math.exp(log_t)))  # Brent skips the ends
    return float(np.clip(math.exp(best), *T_RANGE))


def reliability_bins(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                     n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Top-1 confidence in `n_bins` equal-width bins (lower, upper]: per bin the count, mean confidence and
    accuracy (0 where empty), and the bin edges."""
    probs = np.exp(_log_probs(logits, temperature))
    confidence, correct = probs.max(1), probs.argmax(1) == np.asarray(labels)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)

    def mean(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(index, values.astype(np.float64), n_bins)
        return np.divide(sums, count, out=np.zeros(n_bins), where=count > 0)

    return {"count": count, "confidence": mean(confidence), "accuracy": mean(correct),
            "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def calibration_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict:
    """{"ece": 15-bin expected calibration error of the top-1 confidence, "ece_floor": see `ece_floor`, "nll":
    mean NLL, "brier": mean over samples of sum_k (p_k - y_k)^2} of softmax(logits / temperature)."""
    labels = np.asarray(labels, np.int64)
    if not len(labels):
        return {"ece": float("nan"), "ece_floor": float("nan"), "nll": float("nan"), "brier": float("nan")}
    bins = reliability_bins(logits, labels, temperature)
    ece = float((bins["count"] * np.abs(bins["accuracy"] - bins["confidence"])).sum() / len(labels))
    probs = np.exp(_log_probs(logits, temperature))
    floor = ece_floor(probs.max(1))
    probs[np.arange(len(labels)), labels] -= 1.0
    return {"ece": ece, "ece_floor": floor, "nll": nll(logits, labels, temperature),
            "brier": float((probs ** 2).sum(1).mean())}


def ece_floor(confidence: np.ndarray, draws: int = 200, n_bins: int = N_BINS, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these top-1 confidences would show on this many images: the
    mean over `draws` of the binned ECE when each prediction is right with probability its confidence. A small
    eval split cannot measure calibration below it (e.g. about 0.03-0.05 for 120-600 images at 80-95% accuracy)."""
    confidence = np.asarray(confidence, np.float64)
    rng = np.random.default_rng(seed)
    correct = rng.random((draws, len(confidence))) < confidence  # (draws, n)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.zeros(draws)  # per draw: sum over bins of |correct - confidence summed in the bin|
    for b in np.unique(index):
        in_bin = index == b
        gap += np.abs(correct[:, in_bin].sum(1) - confidence[in_bin].sum())
    return float(gap.mean() / max(len(confidence), 1))


def monitor_score(logits: np.ndarray, labels: np.ndarray, monitor: str) -> float:
    """The val `trainer.monitor` value of `logits` ("loss": the mean NLL)."""
    if monitor == "loss":
        return nll(logits, labels)
    return classification_metrics(labels, np.asarray(logits).argmax(1), np.asarray(logits).shape[1])[monitor]


def decide_tta(mode: str, plain_logits: np.ndarray | None, flip_logits: np.ndarray | None, labels: np.ndarray,
               monitor: str) -> dict:
    """`trainer.tta`: off = no TTA; flip = always; auto = the mirrored view only where averaging the two views'
    logits makes val `monitor` strictly better. Returns {mode, kept, views, monitor, val: {plain, tta}}."""
    decision = {"mode": mode, "kept": mode == "flip", "views": list(PLAIN), "monitor": monitor, "val": None}
    if mode != "off" and plain_logits is not None and flip_logits is not None:
        plain = monitor_score(plain_logits, labels, monitor)
        tta = monitor_score((np.asarray(plain_logits) + np.asarray(flip_logits)) / 2, labels, monitor)
        decision["val"] = {"plain": plain, "tta": tta}
        if mode == "auto":
            decision["kept"] = bool(tta > plain if monitor_direction(monitor) == "max" else tta < plain)
    if decision["kept"]:
        decision["views"] = list(TTA_VIEWS)
    return decision


class _EachView(torch.nn.Module):
    """The logits of every view side by side, (N, views x K): one pass over the loader for all views."""

    def __init__(self, model: torch.nn.Module, views: list[str]):
        super().__init__()
        self.model, self.views = model, views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(apply_view(v, x)) for v in self.views], dim=1)


def view_logits(model: torch.nn.Module, loader, views: list[str], device, accel, progress: bool = False
                ) -> tuple[list[np.ndarray], np.ndarray]:
    """([logits per view], labels) over `loader`, gathered over DDP ranks (original sample order)."""
    both, labels = distributed.gather_arrays(*loop.predict_logits(_EachView(model, views).to(device), loader, device,
                                                                  progress, "val views", accel))
    return np.split(both, len(views), axis=1), labels


def update_best_meta(run_dir: Path, **values: Any) -> None:
    """Add `values` to best's JSON, every other key kept, as a new generation of the weights + JSON pair (DDP:
    rank 0 alone writes)."""
    if distributed.is_main():
        checkpoint.update_meta(run_dir, "best", **values)


def calibrate_run(trainer: TrainerConfig, run_dir: Path, best_val: tuple[np.ndarray, np.ndarray],
                  make_val_loader: Callable[[], Any], device, accel) -> tuple[dict | None, tuple[np.ndarray,
                                                                                              np.ndarray]]:
    """After the fit: decide TTA on val (trainer.tta), fit the temperature (trainer.calibrate) on the val logits
    of the model that ships, write both into best.json. Returns (the metrics.json record or None when both are
    off, the val (logits, labels) the shipped model gives: averaged over the kept views, divided by T)."""
    if trainer.tta == "off" and not trainer.calibrate:
        return None, best_val  # nothing computed, nothing written
    logits, labels = best_val
    decision = decide_tta("off", None, None, labels, trainer.monitor)
    if trainer.tta != "off":  # the best checkpoint (fine-tune or cached path alike), both views in one pass
        model, _ = checkpoint.load_checkpoint(run_dir, "best")
        (plain, flip), labels = view_logits(model, make_val_loader(), TTA_VIEWS, device, accel, trainer.progress)
        decision = decide_tta(trainer.tta, plain, flip, labels, trainer.monitor)
        logits = (plain + flip) / 2 if decision["kept"] else plain
        _logger.info("TTA (trainer.tta=%s): val %s %s plain, %s with hflip -> %s", trainer.tta, trainer.monitor,
                     f"{decision['val']['plain']:.4f}", f"{decision['val']['tta']:.4f}",
                     "kept" if decision["kept"] else "not kept")
    temperature = fit_temperature(logits, labels) if trainer.calibrate else 1.0
    update_best_meta(run_dir, tta=decision["views"], temperature=temperature)
    record = {"tta": decision, "calibrate": bool(trainer.calibrate), "temperature": temperature,
              "val": {"before": calibration_metrics(logits, labels), "after": calibration_metrics(logits, labels,
                                                                                                  temperature)}}
    if trainer.calibrate:
        _logger.info("Temperature %.3f fitted on %d val images: ECE %.4f -> %.4f, NLL %.4f -> %.4f", temperature,
                     len(labels), record["val"]["before"]["ece"], record["val"]["after"]["ece"],
                     record["val"]["before"]["nll"], record["val"]["after"]["nll"])
    return record, ((np.asarray(logits, np.float64) / temperature).astype(np.float32), labels)


def add_test_record(record: dict, logits: np.ndarray, labels: np.ndarray) -> dict:
    """`record` plus "test": ECE/NLL/Brier of the shipped model's test logits (`logits`, already divided by T)
    and of the same TTA at T = 1 ("before")."""
    temperature = record["temperature"]
    return {**record, "test": {"before": calibration_metrics(np.asarray(logits, np.float64) * temperature, labels),
                               "after": calibration_metrics(logits, labels)}}
