"""The probe a fine-tune fit starts from or falls back to (train.py): `strategy.head_init=probe` installs it as the
fine-tune's head (LP-FT); `auto` under `trainer.time_limit` fits it first, saves it as `best` (epoch 0) with the
val bar a fine-tune epoch must beat to replace it (transfer/auto.py `probe_bar`), and records what it tried."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline.features.probe_init import Probe, init_head
from pipeline.model import checkpoint
from pipeline.runtime import distributed
from pipeline.training.metrics import monitor_se
from pipeline.transfer import auto


def start_from_probe(cfg: DictConfig, strategy_info: dict, fit_args: dict, *, spend: bool, cache) -> Probe | None:
    """`strategy.head_init=probe`: the fine-tune's head starts from a linear probe on cached features (LP-FT).
    `spend` (auto under a time limit): the probe (the `features.head` the linear_probe mode trains) is saved as
    `best` (epoch 0) and passed to the fit as its `baseline`, so that a fine-tune epoch replaces it by beating its
    val (less a margin where the rule picked the fine-tune: auto.probe_bar); the fine-tune itself starts from the
    head `strategy.head_init` gives it, as the fixed mode does (LP-FT lost here: docs/recipe.md; from the probe,
    budgeted fine-tunes dropped in epoch 1, digits val 0.92 -> 0.65, and never beat it)."""
    a, model = fit_args, fit_args["model"]
    fallback = spend and cfg.strategy.head_init != "probe"
    own_head = {k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()} if fallback else None
    probe = init_head(model, a["splits"], cfg, a["run_dir"], mode=strategy_info["mode"], device=a["device"],
                      eval_tf=a["eval_tf"], data_cfg=a["data_cfg"], image_cache=cache,
                      class_weights=a["class_weights"], init_bias=a["init_bias"],
                      resumed=a["resumed"] is not None, force=spend, fallback=fallback)
    if probe is not None and not fallback:
        strategy_info["head_init"] = probe.info
    if spend and probe is not None and probe.best_val is not None:  # not on resume: the restored state decides
        monitor = cfg.trainer.monitor
        probe.bar = auto.probe_bar(strategy_info.get("decision") or {}, probe.val[monitor],
                                   monitor_se(monitor, *probe.best_val), cfg.strategy.auto.probe_margin_se)
        if distributed.is_main():
            checkpoint.save_checkpoint(a["run_dir"], "best", model, {**a["meta"], "epoch": 0, "val_metrics": probe.val,
                                                                     "weights_source": "probe"})
        a["baseline"] = probe
    if own_head is not None:
        model.get_classifier().load_state_dict(own_head)  # the fine-tune starts as the fixed mode's does
    return probe


def record_budget_use(cfg: DictConfig, strategy_info: dict, probe: Probe | None, result: dict, run_dir: Path) -> None:
    """auto under `trainer.time_limit`: what it tried with the budget, added to decision.json (and the summary's
    decision paragraph). `probe`: the one auto fitted before its fine-tune, else None."""
    decision = strategy_info.get("decision")
    if not decision or result.get("budget") is None:
        return
    decision["budget"] = auto.budget_record(
        probe.info if probe else None, result["history"], result["best_epoch"], cfg.trainer.monitor,
        mode=strategy_info["mode"], limit=cfg.trainer.time_limit, fit=result["budget"].report(),
        bar=probe.bar if probe else None)
    if distributed.is_main():
        auto.write_decision(run_dir, decision)
