"""Classification metrics (sklearn)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

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
    return confusion_matrix(labels, preds, labels=list(range(num_classes)))
