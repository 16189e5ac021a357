"""Classification metrics (sklearn), per-class reports, and the monitored-metric tracker."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix, f1_score

from pipeline.config import MONITORS

_logger = logging.getLogger(__name__)

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    """accuracy, balanced accuracy and macro-F1 over all classes (absent classes count as 0 recall)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    present = np.unique(labels)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)) if len(present) > 1 else float(
            accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=list(range(num_classes)), average="macro",
                                   zero_division=0)),
        "num_samples": int(len(labels)),
    }


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Count matrix: rows = true class, columns = predicted class."""
    return confusion_matrix(labels, preds, labels=list(range(num_classes)))


def per_class_metrics(labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> dict:
    """{class: {precision, recall, f1, support}} (sklearn classification_report; 0 where undefined)."""
    report = classification_report(labels, preds, labels=list(range(len(class_names))),
                                   target_names=list(class_names), output_dict=True, zero_division=0)
    return {c: {"precision": float(report[c]["precision"]), "recall": float(report[c]["recall"]),
                "f1": float(report[c]["f1-score"]), "support": int(report[c]["support"])} for c in class_names}


def report_text(labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> str:
    """sklearn's text classification report plus the balanced accuracy it does not print."""
    text = classification_report(labels, preds, labels=list(range(len(class_names))),
                                 target_names=list(class_names), digits=4, zero_division=0)
    bal = classification_metrics(labels, preds, len(class_names))["balanced_accuracy"]
    return f"{text}\nbalanced accuracy {bal:.4f}\n"


SHIFT_SE = 3.0  # test below val by more than this many standard errors of the difference: flagged
SHIFT_MIN = 0.03  # ... and by at least this much balanced accuracy (val, which picked the epoch, runs a bit high)


def balanced_accuracy_se(labels: np.ndarray, preds: np.ndarray) -> tuple[float, float]:
    """(balanced accuracy, its standard error): the mean of the per-class recalls r_c over the classes present,
    SE = sqrt(sum_c r_c (1 - r_c) / n_c) / C (binomial per class)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    classes = np.unique(labels)
    recalls = np.array([np.mean(preds[labels == c] == c) for c in classes])
    counts = np.array([np.sum(labels == c) for c in classes])
    return float(recalls.mean()), float(np.sqrt(np.sum(recalls * (1 - recalls) / counts)) / len(classes))


def monitor_se(monitor: str, logits: np.ndarray, labels: np.ndarray) -> float | None:
    """The binomial standard error of a `trainer.monitor` value on one split: balanced_accuracy_se, or
    sqrt(p (1 - p) / n) for accuracy; None for macro_f1 and loss, which have no such closed form."""
    preds, labels = np.asarray(logits).argmax(1), np.asarray(labels)
    if monitor == "balanced_accuracy":
        return balanced_accuracy_se(labels, preds)[1]
    if monitor == "accuracy" and len(labels):
        p = float(np.mean(preds == labels))
        return float(np.sqrt(p * (1 - p) / len(labels)))
    return None


def val_test_gap(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
                 test_labels: np.ndarray) -> dict | None:
    """How far test balanced accuracy falls below val's, in points and in standard errors of the difference.
    `shifted` when the drop is over SHIFT_SE standard errors and SHIFT_MIN: the test split is not drawn like
    val (another source, time or site), so val, which chose the epoch, the temperature and TTA, cannot see
    what test measures. None when either split is empty."""
    if not len(val_labels) or not len(test_labels):
        return None
    val, val_se = balanced_accuracy_se(val_labels, np.asarray(val_logits).argmax(1))
    test, test_se = balanced_accuracy_se(test_labels, np.asarray(test_logits).argmax(1))
    gap, se = val - test, float(np.hypot(val_se, test_se))
    z = gap / se if se > 0 else None  # None: both splits all right or all wrong per class (no sampling spread)
    return {"val": val, "test": test, "gap": gap, "se": se, "z": z,
            "shifted": bool(gap > SHIFT_MIN and (z is None or z > SHIFT_SE))}


def monitor_direction(name: str) -> str:
    """'max' or 'min' for a `trainer.monitor` value (loss-like metrics: lower is better)."""
    return MONITORS[name]


class MonitorTracker:
    """Tracks the best value of a val metric and counts epochs without improvement (early stopping)."""

    def __init__(self, name: str, patience: int = 0):
        self.name, self.mode, self.patience = name, monitor_direction(name), patience
        self.best, self.best_epoch, self.bad_epochs = None, 0, 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; True when it is a new best (the first epoch always is; NaN never beats
        a number, so a run always has a best checkpoint)."""
        if self.best is None or (np.isnan(self.best) and not np.isnan(value)):
            better = True
        elif np.isnan(value):
            better = False
        else:
            better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return better

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], int(state["best_epoch"]), int(state["bad_epochs"])

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience
