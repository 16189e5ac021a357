"""`strategy=auto` under `trainer.time_limit` (budgeted/auto_budget.py): the probe first (saved as `probe` and
`best`), a fine-tune only where one can pay (min_epochs at the deepest candidate depth, else none and the time
given back), and the fine-tune kept only where a paired bootstrap on val says it beats the probe.

The auto thresholds steer the decision on the tiny folder: `similar_gain=5` makes any data "different" (small +
different -> partial), `similar_gain=-5` makes it "similar" (small + similar -> linear_probe; under a limit, the
probe and then a fine-tune where one can pay)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.budgeted import auto_budget
from pipeline.budgeted.auto_budget import Candidate
from pipeline.features import probe_init
from pipeline.model import checkpoint
from pipeline.train import train
from pipeline.training import loop

DIFFERENT, SIMILAR = "strategy.auto.similar_gain=5", "strategy.auto.similar_gain=-5"


def _auto_cfg(cfg_factory, root, *extra):
    return cfg_factory("dataset=folder", f"dataset.root={root}", "backbone=tiny", "backbone.input_size=64",
                       "strategy=auto", "optim.lr=0.05", "features.head_epochs=5", "features.head_patience=0",
                       "trainer.epochs=2", *extra)


def _spy_probe_head(monkeypatch, *, all_wrong: bool = False) -> list:
    """Record the probe heads auto fits; `all_wrong` makes the probe's val logits pick a wrong class everywhere
    (balanced accuracy 0), so any fine-tune with skill beats it by the paired test."""
    heads, original = [], probe_init.train_head

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        if all_wrong:
            logits, labels = out["best_val"]
            wrong = np.full_like(np.asarray(logits), -10.0)
            wrong[np.arange(len(labels)), (np.asarray(labels) + 1) % wrong.shape[1]] = 10.0
            out["best_val"] = (wrong, labels)
        heads.append(out)
        return out

    monkeypatch.setattr(probe_init, "train_head", spy)
    return heads


def _zero_head_after_each_epoch(monkeypatch) -> None:
    """Every fine-tune epoch ends with a zeroed head: val balanced accuracy 1/3 (chance), a known fine-tune val."""
    original = loop.train_one_epoch

    def train_then_zero_head(model, *args, **kwargs):
        stats = original(model, *args, **kwargs)
        with torch.no_grad():  # `model` may be a boundary top: it shares the classifier
            head = model.get_classifier()
            head.weight.zero_()
            head.bias.zero_()
        return stats

    monkeypatch.setattr(loop, "train_one_epoch", train_then_zero_head)


def test_the_probe_stays_best_when_the_fine_tune_is_not_better_by_the_paired_test(tiny_folder, cfg_factory,
                                                                                   monkeypatch):
    """Every fine-tune epoch ends at chance (zeroed head): the probe, saved as `probe` and `best` at epoch 0, is
    what ships; its val metrics are the run's and decision.json has the paired test."""
    heads = _spy_probe_head(monkeypatch)
    _zero_head_after_each_epoch(monkeypatch)
    cfg = _auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m")
    metrics = train(cfg)
    (probe,) = heads
    assert metrics["mode"] == "partial" and metrics["best_epoch"] == 0 and len(metrics["history"]) == 2
    run = Path(cfg.output_dir)
    best = json.loads((run / "best.json").read_text())
    assert best["epoch"] == 0 and best["weights_source"] == "probe"
    weights = load_file(str(run / "best.safetensors"))
    name = next(k for k in weights if k.endswith("weight") and weights[k].shape == probe["weight"].shape)
    assert torch.allclose(weights[name], torch.as_tensor(probe["weight"]).float(), atol=1e-6)
    record = json.loads((run / "decision.json").read_text())["budget"]
    assert record["kept"] == "probe" and [t["what"] for t in record["tried"]] == ["probe", "fine-tune"]
    assert record["tried"][1]["epochs_run"] == 2 and record["finetune_vs_probe"]["monitor"] == "balanced_accuracy"
    assert record["plan"]["chosen"]["epochs_fit"] >= 2 and metrics["decision"]["budget"] == record
    assert "kept: **probe**" in (run / "summary.md").read_text() and "paired bootstrap" in record["why"]
    model, _ = checkpoint.load_checkpoint(run, "best")  # loads as any best checkpoint
    assert model.get_classifier().weight.any()


def test_a_fine_tune_better_by_the_paired_test_replaces_the_probe(tiny_folder, cfg_factory, monkeypatch):
    heads = _spy_probe_head(monkeypatch, all_wrong=True)
    cfg = _auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m")
    metrics = train(cfg)
    assert len(heads) == 1 and metrics["best_epoch"] >= 1
    assert heads[0]["head"] == "logistic"  # features.head=auto: the probe the linear_probe mode would train
    assert "head_init" not in metrics  # the probe is the fallback, not the fine-tune's start
    best = json.loads((Path(cfg.output_dir) / "best.json").read_text())
    assert best["epoch"] == metrics["best_epoch"] and best.get("weights_source") != "probe"
    record = metrics["decision"]["budget"]
    assert record["kept"] == "fine-tune" and record["finetune_vs_probe"]["p_not_better"] <= 0.05
    assert record["ensemble"]["shipped"] is False and "challenger" in record["ensemble"]


def test_no_fine_tune_fits_so_the_probe_is_kept_and_the_time_given_back(tiny_folder, cfg_factory, monkeypatch):
    """A limit too short for any fine-tune: none runs (no epoch, no wait), `best` is the probe and the run ends
    well inside its limit; decision.json says why and how much time it gave back."""
    heads = _spy_probe_head(monkeypatch)
    cfg = _auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=5s")
    begin = time.perf_counter()
    metrics = train(cfg)
    assert len(heads) == 1 and metrics["best_epoch"] == 0 and metrics["history"] == []
    record = metrics["decision"]["budget"]
    assert record["plan"]["chosen"] is None and "given back" in record["plan"]["why"]
    assert record["gave_back_s"] is not None and [t["what"] for t in record["tried"]] == ["probe"]
    assert metrics["freeze_depth"] == metrics["decision"]["freeze_depth"]
    assert time.perf_counter() - begin < 60


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


def test_when_the_rule_picks_the_probe_a_budget_may_fine_tune_after_it(tiny_folder, cfg_factory, monkeypatch):
    """small + similar: without a limit the cached probe alone; with one, the probe, then a planned fine-tune."""
    heads = _spy_probe_head(monkeypatch)
    metrics = train(_auto_cfg(cfg_factory, tiny_folder, SIMILAR, "trainer.time_limit=10m",
                              "strategy.auto.similar_freeze_depth=3"))
    decision = metrics["decision"]
    assert metrics["mode"] == "partial" and decision["rule_mode"] == "linear_probe"
    assert len(heads) == 1 and [t["what"] for t in decision["budget"]["tried"]] == ["probe", "fine-tune"]
    assert decision["freeze_depth"] == decision["budget"]["plan"]["chosen"]["freeze_depth"] == 3
    no_limit = train(_auto_cfg(cfg_factory, tiny_folder, SIMILAR, "output_dir=" + str(tiny_folder.parent / "nl")))
    assert no_limit["mode"] == "linear_probe" and "budget" not in no_limit["decision"]


def _candidate(depth: int, epochs: int, boundary: bool = False) -> Candidate:
    return Candidate(depth, boundary, 0.1, 0.0, 10.0, epochs)


def test_the_deepest_candidate_that_fits_min_epochs_is_planned():
    plan = auto_budget.choose([_candidate(1, 2), _candidate(4, 3), _candidate(4, 9, True)], 100.0, 3)
    assert plan.chosen.freeze_depth == 4 and plan.chosen.boundary  # depth 1 fits 2 < 3; at 4 the cached one fits more
    assert "about 9 epochs fit" in plan.why
    assert auto_budget.choose([_candidate(1, 3), _candidate(4, 9)], 100.0, 3).chosen.freeze_depth == 1


def test_where_no_candidate_fits_min_epochs_none_is_planned():
    plan = auto_budget.choose([_candidate(1, 1), _candidate(4, 2)], 80.0, 3)
    assert plan.chosen is None and "no fine-tune fits 3 epochs in the 80 s left" in plan.why
    assert "(at most 2 at freeze depth 4)" in plan.why and plan.record()["chosen"] is None


def test_epochs_that_fit_keep_the_time_for_after_the_loop():
    assert auto_budget.epochs_that_fit(100.0, setup_s=20.0, epoch_s=10.0, final_s=5.0, max_epochs=100) == 7  # 70/10
    assert auto_budget.epochs_that_fit(100.0, setup_s=20.0, epoch_s=10.0, final_s=5.0, max_epochs=4) == 4
    assert auto_budget.epochs_that_fit(4.0, setup_s=0.0, epoch_s=1.0, final_s=0.0, max_epochs=100) == 0


def test_candidate_depths_run_from_the_rules_deepest_to_the_shallow_unfreeze():
    small = {"n_groups": 8, "freeze_depth": 5, "size": "small"}
    large = {"n_groups": 8, "freeze_depth": 2, "size": "large"}
    assert auto_budget.candidate_depths(small, similar_freeze_depth=2, shallow_unfreeze=3) == [2, 5]
    assert auto_budget.candidate_depths(large, similar_freeze_depth=2, shallow_unfreeze=3) == [2, 5]
    assert auto_budget.candidate_depths({**large, "freeze_depth": 0}, similar_freeze_depth=2,
                                        shallow_unfreeze=3) == [0, 2, 5]
    assert auto_budget.candidate_depths({**small, "freeze_depth": 8}, similar_freeze_depth=2,
                                        shallow_unfreeze=3) == [2, 5]  # the rule's probe (all frozen) is no fine-tune


def test_plan_times_each_depth_on_the_real_model():
    """The tiny backbone (6 layer groups): each candidate is timed (a boundary-cached variant where the split
    works); a long budget plans the deepest, a short one none."""
    import timm

    from pipeline.model import freezing
    from pipeline.runtime.devices import Accel

    model = timm.create_model("test_efficientnet", num_classes=3)
    freezing.apply_strategy(model, mode="partial", freeze_depth=4)
    batch = (torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    sizes = auto_budget.Sizes(train=40, val=12, test=0, steps_per_epoch=5, views=2, max_epochs=100)
    rules = auto_budget.PlanRules(depths=[1, 4], bn="frozen", boundary_cache="auto", memory_bytes=2**34, min_epochs=3)
    kwargs = dict(rules=rules, accel=Accel(torch.device("cpu")), sizes=sizes, load_s_per_image=0.001)
    plan = auto_budget.plan_finetune(model, batch, time_left_s=3600.0, **kwargs)
    assert [(c.freeze_depth, c.boundary) for c in plan.candidates] == [(1, False), (1, True), (4, False), (4, True)]
    assert all(c.step_s > 0 and c.epoch_s > 0 for c in plan.candidates)
    assert plan.chosen.freeze_depth == 1
    assert auto_budget.plan_finetune(model, batch, time_left_s=6.0, **kwargs).chosen is None
    never = auto_budget.plan_finetune(model, batch, time_left_s=3600.0,
                                      **{**kwargs, "rules": dataclasses.replace(rules, boundary_cache="never")})
    assert not any(c.boundary for c in never.candidates)
    assert all(p.requires_grad for p in model.get_classifier().parameters())  # the model itself is untouched


def test_a_run_killed_in_its_fine_tune_resumes_the_planned_fine_tune(tiny_folder, cfg_factory, monkeypatch,
                                                                     sigint_at_step):
    """SIGINT in the planned fine-tune: decision.json already holds the plan, so the resumed run trains the same
    depth on from last.pt (no new probe, no new plan) and still compares the fine-tune with the saved probe."""
    from pipeline.training import interrupts

    sigint_at_step.arm(2)
    cfg = _auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m", "trainer.max_train_batches=3")
    with pytest.raises(interrupts.TrainingInterrupted):
        train(cfg)
    run = Path(cfg.output_dir)
    planned = json.loads((run / "decision.json").read_text())["budget"]["plan"]
    assert planned["chosen"] is not None and (run / "probe.safetensors").is_file()
    sigint_at_step.disarm()
    heads = _spy_probe_head(monkeypatch)
    resumed = train(_auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m",
                              "trainer.max_train_batches=3", "trainer.resume=auto"))
    record = resumed["decision"]["budget"]
    assert not heads and resumed["resumed_from_epoch"] == 0 and len(resumed["history"]) == 2
    assert record["plan"] == planned and resumed["freeze_depth"] == planned["chosen"]["freeze_depth"]
    assert record["finetune_vs_probe"] is not None and record["kept"] in ("probe", "fine-tune")


def test_no_dataloader_workers_outlive_the_run(tiny_folder, cfg_factory, monkeypatch):
    """Persistent-worker loaders end up in reference cycles and their workers ignore SIGTERM, so a loader left to
    interpreter exit hung `make train` after its last line (and a garbage collection mid-run stalled 5 s per
    worker): the run stops their workers itself once its last loader is used (TrainingData.close)."""
    import gc

    import pipeline.train as train_module

    monkeypatch.setattr(train_module, "gc", type("NoCollect", (), {"collect": staticmethod(lambda: 0)}))
    gc.disable()  # no collection may stop them instead
    try:
        train(_auto_cfg(cfg_factory, tiny_folder, DIFFERENT, "trainer.time_limit=10m", "trainer.num_workers=1"))
        live = [o for o in gc.get_objects() if isinstance(o, torch.utils.data.DataLoader)
                and getattr(getattr(o, "_iterator", None), "_workers", None)
                and any(w.is_alive() for w in o._iterator._workers)]
    finally:
        gc.enable()
    assert live == []
