"""Imbalance-aware metrics, the monitor tracker, run-dir plots/reports, and early stopping end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_imagefolder
from pipeline.errors import ConfigError
from pipeline.reports.plots import plot_curves, read_confusion_csv, write_split_reports
from pipeline.train import train
from pipeline.training.metrics import (
    MonitorTracker,
    balanced_accuracy_se,
    classification_metrics,
    per_class_metrics,
    report_text,
    val_test_gap,
)

# 8 majority "b", 2 minority "a"; the model says "b" for all but one minority image
LABELS = np.array([0, 0] + [1] * 8)
PREDS = np.array([0, 1] + [1] * 8)


def test_metrics_expose_what_accuracy_hides():
    m = classification_metrics(LABELS, PREDS, 2)
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    f1_a, f1_b = 2 * 1 * 0.5 / 1.5, 2 * (8 / 9) * 1 / (8 / 9 + 1)
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    pc = per_class_metrics(LABELS, PREDS, ["a", "b"])
    assert pc["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": f1_a, "support": 2})
    assert pc["b"]["precision"] == pytest.approx(8 / 9) and pc["b"]["support"] == 8
    assert "balanced accuracy 0.7500" in report_text(LABELS, PREDS, ["a", "b"])


def test_monitor_tracker_directions_and_patience():
    acc = MonitorTracker("balanced_accuracy", patience=2)
    assert [acc.update(v, e) for e, v in enumerate([0.5, 0.7, 0.7, 0.6], 1)] == [True, True, False, False]
    assert acc.best == 0.7 and acc.best_epoch == 2 and acc.should_stop
    loss = MonitorTracker("loss")
    assert [loss.update(v, e) for e, v in enumerate([float("nan"), 1.0, 0.8, 0.9], 1)] == [True, True, True, False]
    assert loss.best == 0.8 and not loss.should_stop  # patience 0 = never stop


def test_split_reports_write_png_csv_and_text(tmp_path):
    per_class = write_split_reports(tmp_path, "val", LABELS, PREDS, ["a", "b"])
    names, cm = read_confusion_csv(tmp_path / "confusion_val.csv")
    assert names == ["a", "b"] and cm.tolist() == [[1, 1], [0, 8]] and cm.sum() == len(LABELS)
    with Image.open(tmp_path / "confusion_val.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200
    assert "precision" in (tmp_path / "classification_report_val.txt").read_text()
    assert per_class["a"]["recall"] == 0.5
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_balanced_accuracy": 0.5 + e / 10,
                "val_macro_f1": 0.4 + e / 10} for e in (1, 2, 3)]
    with Image.open(plot_curves(history, tmp_path / "curves.png", monitor="macro_f1")) as im:
        assert im.size[0] > 400


def test_train_writes_imbalance_artifacts_and_stops_early(tmp_path, cfg_factory):
    root = make_imagefolder(tmp_path / "imb", {"blue": 4, "green": 16})
    make_imagefolder(root, {"blue": 3, "green": 5}, "val", offset=500)
    make_imagefolder(root, {"blue": 2, "green": 4}, "test", offset=900)
    # lr ~0 with a frozen backbone: val predictions never change, so patience 2 stops after epoch 3 of 6
    cfg = cfg_factory("dataset=folder", f"dataset.root={root}", "backbone=tiny", "strategy=linear_probe",
                      "loss.class_weights=balanced", "loss.prior_bias=auto", "optim.lr=1e-12",
                      "trainer.epochs=6", "trainer.early_stop_patience=2", "trainer.max_train_batches=0",
                      "features.head=linear")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    assert len(metrics["history"]) == 3 and metrics["best_epoch"] == 1
    for name in ("confusion_val.png", "confusion_test.png", "curves.png", "classification_report_val.txt",
                 "classification_report_test.txt"):
        assert (run / name).stat().st_size > 0, name
    for split, n in (("val", 8), ("test", 6)):
        names, cm = read_confusion_csv(run / f"confusion_{split}.csv")
        assert names == ["blue", "green"] and cm.sum() == n == metrics[split]["num_samples"]
        assert set(metrics[split]["per_class"]) == {"blue", "green"}
    plan = json.loads((run / "class_weights.json").read_text())
    assert plan["weights"] == pytest.approx({"blue": 20 / 8, "green": 20 / 32})
    assert plan["prior_bias"]["enabled"]  # ratio 4 > 3, and balanced weights make the prior uniform
    assert plan["prior_bias"]["bias"] == pytest.approx([np.log(0.5)] * 2)
    summary = (run / "summary.md").read_text()
    assert "## Per-class metrics" in summary and "| blue | 4 | 2.5000 | 0.5000 |" in summary
    gap = metrics["val_test_gap"]  # val and test both come from the same generator: no shift flagged
    assert gap["val"] == pytest.approx(metrics["val"]["balanced_accuracy"]) and not gap["shifted"]
    assert "- test vs val: balanced accuracy" in summary


def logits_for(labels: np.ndarray, recalls: list[float]) -> np.ndarray:
    """One-hot logits of a 2-class model whose recall on class c is recalls[c] (the first images right)."""
    preds = labels.copy()
    for c, r in enumerate(recalls):
        idx = np.flatnonzero(labels == c)
        preds[idx[round(r * len(idx)):]] = 1 - c
    return np.eye(2)[preds]


def test_val_test_gap_flags_a_shift_only_beyond_sampling_error():
    big, small = np.repeat([0, 1], 200), np.repeat([0, 1], 10)
    bal, se = balanced_accuracy_se(big, logits_for(big, [0.9, 0.7]).argmax(1))
    assert bal == pytest.approx(0.8) and se == pytest.approx(np.sqrt(0.09 / 200 + 0.21 / 200) / 2)
    # 0.97 on val vs 0.80 on test with 400 images each: ~7 standard errors, a shifted test split
    shifted = val_test_gap(logits_for(big, [0.97, 0.97]), big, logits_for(big, [0.9, 0.7]), big)
    assert shifted["gap"] == pytest.approx(0.17) and shifted["z"] > 5 and shifted["shifted"]
    # the same 0.2 drop on 20 images each is within sampling error (SE ~0.1)
    noisy = val_test_gap(logits_for(small, [1.0, 0.9]), small, logits_for(small, [0.8, 0.7]), small)
    assert noisy["gap"] == pytest.approx(0.2) and not noisy["shifted"]
    # test above val is never a shift
    assert not val_test_gap(logits_for(big, [0.7, 0.7]), big, logits_for(big, [0.9, 0.9]), big)["shifted"]
    assert val_test_gap(np.zeros((0, 2)), np.zeros(0, int), logits_for(big, [1, 1]), big) is None


def test_unknown_monitor_fails_before_training(cfg_factory, tiny_folder):
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "trainer.monitor=f1")
    with pytest.raises(ConfigError, match="trainer.monitor='f1'"):
        train(cfg)
