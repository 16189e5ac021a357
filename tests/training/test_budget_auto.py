"""`strategy=auto` under `trainer.time_limit` spends the budget: the converged probe on cached features first (saved
as `best`, epoch 0), then the fine-tune of the resolved mode for the time left, started as the fixed mode starts;
the better on val is `best`, and decision.json says what was tried, for how long and what was kept. Without a
limit auto runs its mode as before.

The auto thresholds steer the decision on the tiny folder: `similar_gain=5` makes any data "different" (small +
different -> partial), `similar_gain=-5` makes it "similar" (small + similar -> linear_probe; under a limit, the
probe and then a partial fine-tune)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.features import probe_init
from pipeline.model import checkpoint
from pipeline.train import train
from pipeline.training import loop
from pipeline.training.metrics import monitor_se
from pipeline.transfer import auto

DIFFERENT, SIMILAR = "strategy.auto.similar_gain=5", "strategy.auto.similar_gain=-5"


def _auto_cfg(cfg_factory, root, *extra):
    return cfg_factory("dataset=folder", f"dataset.root={root}", "backbone=tiny", "backbone.input_size=64",
                       "strategy=auto", "optim.lr=0.05", "features.head_epochs=5", "features.head_patience=0",
                       "trainer.epochs=2", *extra)


def _spy_probe_head(monkeypatch, *, val_score: float | None = None) -> list:
    """Record the probe heads auto fits; `val_score` overwrites the probe's reported val balanced accuracy."""
    heads, original = [], probe_init.train_head

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        if val_score is not None:
            out["history"][out["best_epoch"] - 1]["val_balanced_accuracy"] = val_score
        heads.append(out)
        return out

    monkeypatch.setattr(probe_init, "train_head", spy)
    return heads


def test_the_probe_stays_best_when_no_fine_tune_epoch_beats_it(tiny_folder, cfg_factory, monkeypatch):
    """Every fine-tune epoch ends with a zeroed head (val balanced accuracy 1/3, chance): the probe, saved as
    `best` at epoch 0, is what ships; its val metrics are the run's, and the test split is scored with it."""
    heads = _spy_probe_head(monkeypatch)
    _zero_head_after_each_epoch(monkeypatch)
    cfg = _auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m")
    metrics = train(cfg)
    (probe,) = heads
    score = probe["history"][probe["best_epoch"] - 1]["val_balanced_accuracy"]
    assert metrics["mode"] == "partial" and score > 0.34  # the probe beats a zeroed head
    assert metrics["best_epoch"] == 0 and metrics["val"]["balanced_accuracy"] == pytest.approx(score)
    assert all(h["val_balanced_accuracy"] == pytest.approx(1 / 3) for h in metrics["history"])
    run = Path(cfg.output_dir)
    best = json.loads((run / "best.json").read_text())
    assert best["epoch"] == 0 and best["weights_source"] == "probe"
    weights = load_file(str(run / "best.safetensors"))
    name = next(k for k in weights if k.endswith("weight") and weights[k].shape == probe["weight"].shape)
    assert torch.allclose(weights[name], torch.as_tensor(probe["weight"]).float(), atol=1e-6)
    budget = json.loads((run / "decision.json").read_text())["budget"]
    assert budget["kept"] == "probe" and [t["what"] for t in budget["tried"]] == ["probe", "fine-tune (partial)"]
    assert budget["tried"][1]["epochs_run"] == 2 and budget["tried"][1]["seconds"] > 0
    assert metrics["decision"]["budget"] == budget
    assert "kept: **probe**" in (run / "summary.md").read_text()
    model, _ = checkpoint.load_checkpoint(run, "best")  # loads as any best checkpoint
    assert model.get_classifier().weight.any()


def _zero_head_after_each_epoch(monkeypatch) -> None:
    """Every fine-tune epoch ends with a zeroed head: val balanced accuracy 1/3 (chance), a known fine-tune val."""
    original = loop.train_one_epoch

    def train_then_zero_head(model, *args, **kwargs):
        stats = original(model, *args, **kwargs)
        with torch.no_grad():
            model.get_classifier().weight.zero_()
            model.get_classifier().bias.zero_()
        return stats

    monkeypatch.setattr(loop, "train_one_epoch", train_then_zero_head)


@pytest.mark.parametrize("margin_se, kept_epoch", [(1.0, 1), (0.0, 0)])
def test_a_fine_tune_the_rule_picked_keeps_its_margin_over_the_probe(tiny_folder, cfg_factory, monkeypatch, margin_se,
                                                                      kept_epoch):
    """small + different (the rule picked a partial fine-tune): the probe's val is 0.02 above the fine-tune's (1/3)
    and its standard error is 0.05, so within one SE the fine-tune stays; with `probe_margin_se=0` only beating
    the probe would replace it, and the probe stays."""
    _spy_probe_head(monkeypatch, val_score=1 / 3 + 0.02)
    _zero_head_after_each_epoch(monkeypatch)
    monkeypatch.setattr("pipeline.features.probe_fallback.monitor_se", lambda monitor, logits, labels: 0.05)
    cfg = _auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m",
                    f"strategy.auto.probe_margin_se={margin_se}")
    metrics = train(cfg)
    assert metrics["best_epoch"] == kept_epoch
    budget = metrics["decision"]["budget"]
    assert budget["kept"] == ("probe" if kept_epoch == 0 else "fine-tune epoch 1")
    if margin_se:
        assert "less the margin the rule's fine-tune gets (0.3533 - 0.0500 = 0.3033" in budget["why"]
    else:
        assert budget["why"] == "no fine-tune epoch beat the probe's val balanced_accuracy (0.3533) within the budget"


def test_where_the_rule_picked_the_probe_a_fine_tune_must_beat_it(tiny_folder, cfg_factory, monkeypatch):
    """small + similar (the rule picked the probe; the budget adds a fine-tune): no margin, the probe stays."""
    _spy_probe_head(monkeypatch, val_score=1 / 3 + 0.02)
    _zero_head_after_each_epoch(monkeypatch)
    monkeypatch.setattr("pipeline.features.probe_fallback.monitor_se", lambda monitor, logits, labels: 0.05)
    metrics = train(_auto_cfg(cfg_factory, tiny_folder, SIMILAR, "trainer.time_limit=10m",
                              "strategy.auto.probe_margin_se=1"))
    assert metrics["decision"]["rule_mode"] == "linear_probe" and metrics["best_epoch"] == 0


def test_probe_bar_and_monitor_se():
    fine_tune_rule, probe_rule = {"mode": "partial"}, {"mode": "partial", "rule_mode": "linear_probe"}
    assert auto.probe_bar(fine_tune_rule, 0.98, 0.012, 2.0) == pytest.approx(0.956)
    assert auto.probe_bar(fine_tune_rule, 0.98, 0.012, 0.0) == 0.98
    assert auto.probe_bar(fine_tune_rule, 0.98, None, 2.0) == 0.98
    assert auto.probe_bar(probe_rule, 0.98, 0.012, 2.0) == 0.98
    logits = np.eye(2)[[0, 0, 0, 1, 1, 0]]  # class 0: 3/3 right; class 1: 2/3 right
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert monitor_se("balanced_accuracy", logits, labels) == pytest.approx(np.sqrt(2 / 3 * 1 / 3 / 3) / 2)
    assert monitor_se("accuracy", logits, labels) == pytest.approx(np.sqrt(5 / 6 * 1 / 6 / 6))
    assert monitor_se("loss", logits, labels) is None and monitor_se("macro_f1", logits, labels) is None


def test_a_fine_tune_epoch_that_beats_the_probe_replaces_it(tiny_folder, cfg_factory, monkeypatch):
    """The probe reports val 0 (as if it had failed): the first fine-tune epoch beats it and becomes `best`."""
    heads = _spy_probe_head(monkeypatch, val_score=0.0)
    cfg = _auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m")
    metrics = train(cfg)
    assert len(heads) == 1 and metrics["best_epoch"] >= 1
    assert heads[0]["head"] == "logistic"  # features.head=auto: the probe the linear_probe mode would train
    assert "head_init" not in metrics  # the probe is the fallback, not the fine-tune's start
    run = Path(cfg.output_dir)
    best = json.loads((run / "best.json").read_text())
    assert best["epoch"] == metrics["best_epoch"] and "weights_source" not in best
    budget = metrics["decision"]["budget"]
    assert budget["kept"] == f"fine-tune epoch {metrics['best_epoch']}" and budget["limit"] == "10m"
    assert budget["tried"][0]["what"] == "probe"


def test_the_fine_tune_after_the_probe_starts_from_the_fixed_modes_head(tiny_folder, cfg_factory, monkeypatch,
                                                                        tmp_path):
    """The classifier at the first train step is the one a run without a limit starts from, not the probe's."""
    heads, starts, original = _spy_probe_head(monkeypatch), [], loop.train_one_epoch

    def record_start(model, *args, **kwargs):
        if kwargs.get("epoch") == 1:
            starts.append({k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", record_start)
    train(_auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m", "trainer.epochs=1"))
    train(_auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.epochs=1", f"output_dir={tmp_path / 'no_limit'}"))
    (probe,) = heads
    budgeted, fixed = starts
    assert all(torch.equal(budgeted[k], fixed[k]) for k in fixed)
    assert not torch.allclose(budgeted["weight"], torch.as_tensor(probe["weight"]).float())


def test_without_a_limit_auto_fine_tunes_from_a_zero_head_as_before(tiny_folder, cfg_factory, monkeypatch):
    heads = _spy_probe_head(monkeypatch)
    metrics = train(_auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.epochs=1"))
    assert metrics["mode"] == "partial" and not heads and "head_init" not in metrics
    assert "budget" not in metrics["decision"] and metrics["best_epoch"] == 1


def test_when_the_rule_picks_the_probe_a_budget_also_tries_a_fine_tune_after_it(tiny_folder, cfg_factory,
                                                                                 monkeypatch):
    """small + similar: without a limit the cached probe alone; with one, the probe (saved as `best`), then a
    partial fine-tune with `similar_freeze_depth` groups frozen, and the record says both were tried."""
    heads = _spy_probe_head(monkeypatch)
    metrics = train(_auto_cfg(cfg_factory, tiny_folder, SIMILAR, "trainer.time_limit=10m",
                              "strategy.auto.similar_freeze_depth=3"))
    decision = metrics["decision"]
    assert metrics["mode"] == "partial" and decision["rule_mode"] == "linear_probe" and decision["freeze_depth"] == 3
    assert len(heads) == 1 and [t["what"] for t in decision["budget"]["tried"]] == ["probe", "fine-tune (partial)"]
    assert "then a fine-tune with the first 3 generic groups frozen" in decision["rule"]
    no_limit = train(_auto_cfg(cfg_factory, tiny_folder, SIMILAR, "output_dir=" + str(tiny_folder.parent / "nl")))
    assert no_limit["mode"] == "linear_probe" and "budget" not in no_limit["decision"]


def test_budget_paragraph_lists_what_was_tried():
    record = auto.budget_record({"val_balanced_accuracy": 0.8, "seconds": 2.5, "epochs": 30},
                                [{"val_balanced_accuracy": 0.7}, {"val_balanced_accuracy": 0.9}], 2,
                                "balanced_accuracy", mode="partial", limit="3m",
                                fit={"epochs_run": 2, "planned_epochs": 3, "stopped": "time_limit",
                                     "loop_end_s": 100.0, "spent_before_training_s": 10.0})
    text = "\n".join(auto.budget_paragraph(record))
    assert record["kept"] == "fine-tune epoch 2" and record["tried"][1]["seconds"] == 90.0
    assert "val 0.8000 in 2.5 s (30 head epochs)" in text and "2 epoch(s) of 3 planned in 90.0 s" in text
    assert "0.7000, 0.9000" in text


@pytest.mark.parametrize("min_steps, chosen", [(1, "deep"), (10**6, "shallow")])
def test_small_different_data_trains_deeper_when_the_budget_fits_enough_steps(tiny_folder, cfg_factory, min_steps,
                                                                              chosen):
    """small + different under a limit: a train step at `similar_freeze_depth` is timed and the steps the limit
    fits at that speed decide between it and the shallow unfreeze; the model trains at the chosen depth and
    decision.json says why. The tiny backbone has 6 layer groups: shallow (top 2 train) leaves 4 frozen, deep 1."""
    cfg = _auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m", "strategy.auto.shallow_unfreeze=2",
                    "strategy.auto.similar_freeze_depth=1", f"strategy.auto.deep_min_steps={min_steps}")
    metrics = train(cfg)
    decision = json.loads((Path(cfg.output_dir) / "decision.json").read_text())
    record = decision["budget_depth"]
    assert decision["n_groups"] == 6 and record["chosen"] == chosen and record["min_steps"] == min_steps
    assert record["timed_step_s"] > 0 and record["timed_forward_s"] > 0 and record["timed_batch"] > 0
    assert record["fitting_steps"] >= 1 and (record["fitting_steps"] >= min_steps) == (chosen == "deep")
    depth = {"deep": 1, "shallow": 4}[chosen]
    assert decision["freeze_depth"] == metrics["freeze_depth"] == depth
    assert ("so the fine-tune trains all but those" in decision["rule"]) == (chosen == "deep")
    assert f"about {record['fitting_steps']} train steps" in (Path(cfg.output_dir) / "summary.md").read_text()


def test_without_a_limit_small_different_data_keeps_the_shallow_unfreeze(tiny_folder, cfg_factory):
    metrics = train(_auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "strategy.auto.shallow_unfreeze=2",
                              "strategy.auto.deep_min_steps=1", "trainer.epochs=1"))
    assert metrics["freeze_depth"] == 4 and "budget_depth" not in metrics["decision"]


def test_depth_record_and_rule_text():
    decision = {"mode": "partial", "freeze_depth": 5, "n_groups": 8, "rule": "small + different -> shallow",
                "size": "small", "similarity": {"similar": False}}
    timing = {"step_s": 0.5, "forward_s": 0.2, "batch": 32}
    assert auto.deepens_with_budget(decision, 2)
    deep = auto.size_depth_to_budget(decision, fitting_steps=100, min_steps=100, deep_freeze_depth=2, timing=timing)
    shallow = auto.size_depth_to_budget(decision, fitting_steps=99, min_steps=100, deep_freeze_depth=2, timing=timing)
    assert deep["freeze_depth"] == 2 and shallow["freeze_depth"] == 5
    assert "about 100 train steps fit" in deep["rule"] and "(< 100), so the shallow unfreeze stays" in shallow["rule"]
    assert deep["budget_depth"] == {"chosen": "deep", "shallow_freeze_depth": 5, "deep_freeze_depth": 2,
                                    "fitting_steps": 100, "min_steps": 100, "timed_step_s": 0.5,
                                    "timed_forward_s": 0.2, "timed_batch": 32}
    assert not auto.deepens_with_budget({**decision, "freeze_depth": 2}, 2)  # the shallow unfreeze is as deep
    assert not auto.deepens_with_budget({**decision, "similarity": {"similar": True}}, 2)
    assert not auto.deepens_with_budget({**decision, "size": "large"}, 2)
