"""Curves where people's tools read them: history.csv, TensorBoard event files, MLflow (optional package)."""
from __future__ import annotations

import csv
import importlib.machinery
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_cfg
from pipeline.errors import ConfigError
from pipeline.train import train
from pipeline.training import tracking
from pipeline.training.loop import top5

RUN = ("dataset=folder", "backbone=tiny", "backbone.input_size=64", "trainer.epochs=2", "trainer.max_train_batches=0",
       "features.head=linear")  # the cached path's epoch curves: the linear head (logistic fits once)
CSV_OF = {"epoch": "epoch", "train_loss": "train_loss", "eval_loss": "val_loss", "eval_top1": "val_accuracy",
          "eval_balanced_accuracy": "val_balanced_accuracy", "eval_macro_f1": "val_macro_f1"}


@pytest.mark.parametrize("strategy, lr_columns", [("finetune", {"lr_head", "lr_group0", "lr_group5"}),
                                                  ("linear_probe", {"lr_head"})])
def test_history_csv_and_tensorboard_events_read_back_on_both_paths(tiny_folder, cfg_factory, caplog, strategy,
                                                                    lr_columns):
    with caplog.at_level(logging.INFO):
        metrics = train(cfg_factory(*RUN, f"dataset.root={tiny_folder}", f"strategy={strategy}"))
    run, history = Path(metrics["run_dir"]), metrics["history"]
    with (run / "history.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(history) == 2 and lr_columns <= set(rows[0])
    for row, h in zip(rows, history):
        assert {c: float(row[c]) for c in CSV_OF} == {c: float(h[k]) for c, k in CSV_OF.items()}
        assert {c: float(row[c]) for c in lr_columns} == {c: h[c] for c in lr_columns}
    assert history[0]["lr_head"] > history[1]["lr_head"] >= 0  # cosine: each epoch's LR at its end
    assert f"lr {history[0]['lr_head']:.2e}" in caplog.text  # in the epoch log line

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for tag, key in (("val/loss", "val_loss"), ("train/loss", "train_loss"), ("val/balanced_accuracy",
                     "val_balanced_accuracy"), ("lr/head", "lr_head")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in history]


def test_tensorboard_can_be_switched_off(tiny_folder, cfg_factory):
    run = Path(train(cfg_factory(*RUN, f"dataset.root={tiny_folder}", "strategy=linear_probe",
                                 "trainer.tensorboard=false"))["run_dir"])
    assert (run / "history.csv").is_file() and not (run / "tensorboard").exists()


def test_mlflow_requested_but_not_installed_is_a_one_line_error(tiny_folder, cfg_factory, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not importable, whatever is installed
    with pytest.raises(ConfigError) as err:
        train(cfg_factory(*RUN, f"dataset.root={tiny_folder}", "trainer.mlflow=true"))
    assert "pip install mlflow" in str(err.value) and "\n" not in str(err.value)
    assert not (Path(cfg_factory().output_dir) / "history.csv").exists()  # stopped at start-up


def test_mlflow_gets_params_and_each_epochs_metrics(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("mlflow")
    fake.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    for name in ("set_experiment", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(fake, name, lambda *a, _name=name, **k: calls.append((_name, a, k)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    cfg = compose_cfg(["trainer.mlflow=true", "trainer.tensorboard=false"])
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.5, "lr_head": 1e-3},
               {"epoch": 2, "train_loss": 0.8, "val_loss": 0.7, "val_accuracy": 0.75, "lr_head": 5e-4}]
    run_config = OmegaConf.to_container(cfg, resolve=True)
    with tracking.RunTracker(tmp_path, cfg.trainer, run_config) as curves:
        for epoch in (1, 2):
            curves.log(history[:epoch])
    assert [c[0] for c in calls] == ["set_experiment", "start_run", "log_params", "log_metrics", "log_metrics",
                                     "end_run"]
    params = calls[2][1][0]
    assert params["optim.lr"] == str(cfg.optim.lr) and len(params) < 100  # MLflow's batch limit
    assert calls[4][1][0] == {"train_loss": 0.8, "val_loss": 0.7, "val_accuracy": 0.75, "lr_head": 5e-4}
    assert calls[4][2] == {"step": 2} and calls[5][1] == ("FINISHED",)
    with pytest.raises(KeyboardInterrupt), tracking.RunTracker(tmp_path, cfg.trainer, run_config):
        raise KeyboardInterrupt
    assert calls[-1][1] == ("KILLED",)


def test_top5_accuracy_and_history_columns_of_groups_thawed_later():
    logits = np.tile(np.arange(7.0), (2, 1))  # top 5 = classes 2..6
    assert top5(logits, np.array([6, 0]), 7) == {"top5_accuracy": 0.5}
    assert top5(logits[:, :5], np.array([0, 1]), 5) == {}  # 5 classes or fewer: always 1, not reported
    header, rows = tracking.history_table([{"epoch": 1, "val_top5_accuracy": 0.5, "lr_head": 0.1, "seconds": 3},
                                           {"epoch": 2, "val_top5_accuracy": 0.6, "lr_head": 0.05, "lr_group5": 0.01}])
    assert header == ["epoch", "eval_top5", "lr_head", "lr_group5"]
    assert rows == [[1, 0.5, 0.1, ""], [2, 0.6, 0.05, 0.01]]


def test_ema_val_scores_have_their_own_columns_and_tensorboard_tags():
    header, rows = tracking.history_table([{"epoch": 1, "val_loss": 0.5, "ema_val_loss": 0.4,
                                            "ema_val_balanced_accuracy": 0.9}])
    assert header == ["epoch", "eval_loss", "ema_eval_loss", "ema_eval_balanced_accuracy"]
    assert rows == [[1, 0.5, 0.4, 0.9]]
    assert tracking._tag("ema_val_loss") == "ema/val_loss"
