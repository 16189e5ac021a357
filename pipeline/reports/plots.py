"""Run-dir plots and reports: confusion matrix (PNG + CSV), per-epoch curves, classification report,
reliability diagram (with trainer.tta / trainer.calibrate).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global state).
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.runtime.files import write_csv, write_figure, write_text
from pipeline.training import metrics as M
from pipeline.training.calibration import calibration_metrics, reliability_bins

_logger = logging.getLogger(__name__)

ANNOTATE_MAX_CLASSES = 30  # beyond this, cell numbers would be unreadable


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    return write_figure(path, fig, dpi=110, bbox_inches="tight")


def write_cooccurrence(path: Path, matrix: np.ndarray, class_names: Sequence[str]) -> Path:
    """Multi-label data: train images carrying both labels of each pair (the diagonal: carrying the label)."""
    k = len(class_names)
    fig = Figure(figsize=(max(4.0, 0.45 * k + 2), max(3.5, 0.45 * k + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(k), yticks=range(k), title="train images with both labels (diagonal: with the label)")
    ax.set_xticklabels(class_names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    if k <= ANNOTATE_MAX_CLASSES:
        peak = matrix.max() or 1
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > peak / 2 else "black")
    return _save(fig, path)


def _matrix_panel(ax, matrix: np.ndarray, class_names: Sequence[str], title: str, fmt: str, vmax: float) -> None:
    k = len(class_names)
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    tilt = k > 3 or max(len(c) for c in class_names) > 8
    ax.set_xticklabels(class_names, rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    if k <= ANNOTATE_MAX_CLASSES:
        for i in range(k):
            for j in range(k):
                value = matrix[i, j]
                ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8,
                        color="white" if value > 0.6 * vmax else "black")


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Two panels: counts, and rows normalised to 1 (per-class recall on the diagonal)."""
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = max(4.0, 0.45 * len(class_names) + 2.5) + 0.06 * max(len(c) for c in class_names)
    fig = Figure(figsize=(2 * side + 1, side), layout="constrained")
    ax_counts, ax_norm = fig.subplots(1, 2)
    _matrix_panel(ax_counts, cm, class_names, "counts", "d", max(int(cm.max()), 1))
    _matrix_panel(ax_norm, normalised, class_names, "row-normalised (recall)", ".2f", 1.0)
    if title:
        fig.suptitle(title)
    return _save(fig, Path(path))


def write_confusion_csv(cm: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    """Count matrix with class names as header (predicted) and first column (true)."""
    rows = [[name, *(int(v) for v in row)] for name, row in zip(class_names, np.asarray(cm))]
    return write_csv(path, rows, header=["true\\predicted", *class_names])


def read_confusion_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Inverse of write_confusion_csv: (class names, count matrix)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64)


def plot_curves(history: Sequence[dict], path: str | Path, monitor: str = "balanced_accuracy") -> Path:
    """Left: train and val loss per epoch. Right: val balanced accuracy (and the monitored metric)."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="val loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    names = ["balanced_accuracy"] + ([monitor] if monitor not in ("balanced_accuracy", "loss") else [])
    for name in names:
        ax_metric.plot(epochs, [h[f"val_{name}"] for h in history], "o-", label=f"val {name}")
    ax_metric.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1.02))
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, Path(path))


def plot_reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, path: str | Path,
                     title: str = "") -> Path:
    """Accuracy vs top-1 confidence in 15 bins, for softmax(logits) (before) and softmax(logits / temperature)
    (after; drawn only when temperature != 1), each with its ECE in the legend; the diagonal is perfect."""
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    curves = [("before (T = 1)", 1.0, "tab:red")] + ([(f"after (T = {temperature:.3g})", temperature, "tab:blue")]
                                                      if temperature != 1.0 else [])
    for name, t, color in curves:
        bins = reliability_bins(logits, labels, t)
        filled = bins["count"] > 0
        ece = calibration_metrics(logits, labels, t)["ece"]
        ax.plot(bins["confidence"][filled], bins["accuracy"][filled], "o-", color=color,
                label=f"{name}: ECE {ece:.4f}")
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
           title=title or "reliability")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, Path(path))


def write_split_reports(run_dir: str | Path, split: str, labels: np.ndarray, preds: np.ndarray,
                        class_names: Sequence[str]) -> dict:
    """confusion_<split>.png/.csv and classification_report_<split>.txt; returns the per-class metrics."""
    run_dir = Path(run_dir)
    cm = M.confusion(labels, preds, len(class_names))
    write_confusion_csv(cm, class_names, run_dir / f"confusion_{split}.csv")
    plot_confusion(cm, class_names, run_dir / f"confusion_{split}.png", title=f"{split}: {int(cm.sum())} images")
    write_text(run_dir / f"classification_report_{split}.txt", M.report_text(labels, preds, class_names))
    _logger.info("Wrote confusion_%s.png/.csv and classification_report_%s.txt", split, split)
    return M.per_class_metrics(labels, preds, class_names)


def write_eval_reports(run_dir: Path, metrics: dict, evals: dict, classes: list[str], history: list) -> None:
    """Per split in `evals` ({split: (logits, labels)}): confusion PNG/CSV, text report, per-class metrics;
    with `metrics["calibration"]` also reliability_<split>.png (the logits are the calibrated ones)."""
    temperature = (metrics.get("calibration") or {}).get("temperature")
    for split, (logits, labels) in evals.items():
        if len(labels):
            metrics[split]["per_class"] = write_split_reports(run_dir, split, labels, logits.argmax(1), classes)
            if temperature is not None:  # before = the same TTA at T = 1
                plot_reliability(np.asarray(logits, np.float64) * temperature, labels, temperature,
                                 run_dir / f"reliability_{split}.png", title=f"{split}: {len(labels)} images")
    plot_curves(history, run_dir / "curves.png", metrics["monitor"])
