"""`strategy=auto` under `trainer.time_limit`: the one home of "auto under a time limit".

    applies(...)       whether a run goes this way (auto, a limit, a mode whose backbone trains: small + similar
                       data gets one too, transfer/auto.py mode_under_time_limit)
    plan_finetune(...) which fine-tune can pay in the time left, or none
    selection.select   probe, fine-tune or their ensemble, by a paired test on the same val images
                       (budgeted/selection.py)
    run(...)           the three in order, recorded in decision.json `budget`

1. **The probe first.** The converged linear probe on cached features (features/probe_init.fit_probe) is fitted,
   saved as `probe` and as `best` (epoch 0), so a run stopped later still ships it.
2. **Plan only fine-tunes that can pay** (plan_finetune). Candidate depths run from the deepest the rule allows
   to the shallow unfreeze (`strategy.auto.shallow_unfreeze` top groups); the shallow one trains on activations
   cached at its freeze boundary where that works and fits in memory (training/boundary.py). One train step of
   each is timed on a copy of the model, with the loader's time per batch; the deepest candidate that fits at
   least `strategy.auto.min_epochs` epochs in the time left is planned. None fits: no fine-tune runs and the
   run ends early: the time is given back, not sat out.
3. **Selection you can trust** (budgeted/selection.py). The fine-tune's best epoch replaces the probe only where a
   paired bootstrap over the val images says it is better (one-sided, `strategy.auto.select_alpha`); "not worse by
   a margin" is not enough. The probe + fine-tune ensemble (mean of temperature-calibrated probabilities) replaces
   the kept model by the same test, where `strategy.auto.ensemble` allows it.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.budgeted import selection as selecting
from pipeline.budgeted.selection import Selection
from pipeline.config import BACKBONE_MODES
from pipeline.config.checks import parse_duration
from pipeline.data import folder
from pipeline.features.probe_init import Probe
from pipeline.model import freezing
from pipeline.runtime import distributed
from pipeline.runtime.devices import Accel, prepare_model
from pipeline.runtime.files import write_json
from pipeline.runtime.memory import memory_budget
from pipeline.training import boundary, budget, loop
from pipeline.training.fit import FitResult

_logger = logging.getLogger(__name__)

TIMED_STEPS = 2  # train steps timed after a warm-up one
CHECKPOINT_S = 1.0  # an epoch's best + last writes, until the fit measures them
BOUNDARY_MEMORY_SHARE = 0.25  # the boundary cache may take this share of the memory budget
# The boundary cache's passes, from one timed batch: a loader start per pass, and the per-image time x 1.3 (the
# loader's collate and the float16 copy; chest_xray, 5 minutes: 88 s measured where the timed batch alone said 59)
PASS_START_S, SETUP_FACTOR = 1.0, 1.3


def applies(*, strategy_mode: str, time_limit: str | None, mode: str) -> bool:
    """auto under a limit whose resolved `mode` trains the backbone (the rule's fine-tune, or small + similar data
    whose probe may be followed by one: transfer/auto.py mode_under_time_limit)."""
    return strategy_mode == "auto" and time_limit is not None and mode in BACKBONE_MODES


def after_loop_images(images: int, settings: "Settings") -> int:
    """The eval images' worth of work to keep time for after the loop (final_eval.images_after_loop): twice as much
    where the ensemble may ship, since it runs two backbones through the test split and the final checks (flowers,
    5 minutes: 38 s after the loop where 21 s were kept for one model, ending at 313 s)."""
    return images * (2 if settings.ship_ensemble else 1)


def candidate_depths(decision: dict, *, similar_freeze_depth: int, shallow_unfreeze: int) -> list[int]:
    """Freeze depths to try, deepest (fewest frozen groups) first: the rule's, the similar-data depth (the stem
    and first stage frozen) and the shallow unfreeze (top `shallow_unfreeze` groups train)."""
    n = decision["n_groups"]
    depths = {decision["freeze_depth"], min(similar_freeze_depth, n), max(0, n - shallow_unfreeze)}
    return sorted(d for d in depths if d < n)


@dataclass
class Candidate:
    freeze_depth: int
    boundary: bool  # trains on activations cached at the freeze boundary
    step_s: float  # one train step, compute and loading
    setup_s: float  # before the first epoch: the boundary cache's passes
    epoch_s: float
    epochs_fit: int
    note: str = ""


@dataclass
class Plan:
    chosen: Candidate | None
    candidates: list[Candidate]
    time_left_s: float
    min_epochs: int
    why: str

    def record(self) -> dict:
        return {"chosen": asdict(self.chosen) if self.chosen else None, "why": self.why,
                "time_left_s": round(self.time_left_s, 1), "min_epochs": self.min_epochs,
                "candidates": [{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(c).items()}
                               for c in self.candidates]}


def time_train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, accel: Accel,
                    steps: int = TIMED_STEPS) -> dict:
    """Seconds of one train step's forward and backward (after a warm-up step) and of one no-grad forward on
    `images`, with `model`'s trainable layers as they are. BatchNorm statistics move and gradients are cleared
    (no optimizer step): give it a copy. The loader and the optimizer update are not in it."""
    images, labels = accel.images(images), labels.to(accel.device)

    def step() -> None:
        with accel.autocast():
            loss_value = F.cross_entropy(model(images), labels)
        loss_value.backward()
        model.zero_grad(set_to_none=True)

    model.train()
    step()
    begin = budget.now()
    for _ in range(steps):
        step()
    step_s = (budget.now() - begin) / steps
    model.eval()
    begin = budget.now()
    with torch.no_grad(), accel.autocast():
        model(images)
    return {"step_s": step_s, "forward_s": budget.now() - begin, "batch": len(labels)}


@dataclass
class Sizes:
    """What the plan counts: images per split, steps per epoch, views of the boundary cache, the epoch cap."""
    train: int
    val: int
    test: int  # eval images' worth of work after the loop (Job.final_images)
    steps_per_epoch: int
    views: int
    max_epochs: int


def epochs_that_fit(time_left_s: float, *, setup_s: float, epoch_s: float, final_s: float, max_epochs: int) -> int:
    """Whole epochs in `time_left_s` after `setup_s`, keeping `final_s` + the budget's reserve for after the loop."""
    left = time_left_s - setup_s - final_s - budget.RESERVE_S
    return max(0, min(max_epochs, math.floor(left / max(epoch_s, 1e-9)))) if left > 0 else 0


@dataclass(frozen=True)
class PlanRules:
    """Which fine-tunes plan_finetune tries and what it plans: the candidate freeze `depths` under the `bn` policy,
    each also on cached boundary activations unless `boundary_cache` is never (auto: only where the cache takes at
    most BOUNDARY_MEMORY_SHARE of `memory_bytes`), and the `min_epochs` a planned one must fit."""
    depths: list[int]
    bn: str
    boundary_cache: str
    memory_bytes: int
    min_epochs: int


def plan_finetune(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], *, rules: PlanRules,
                  accel: Accel, sizes: Sizes, time_left_s: float, load_s_per_image: float) -> Plan:
    """Time each candidate depth (module doc, step 2) and plan the deepest that fits `rules.min_epochs` epochs.
    `batch`: one train batch (images, labels); `load_s_per_image`: the loader's seconds per train image."""
    bn, boundary_cache, memory_bytes = rules.bn, rules.boundary_cache, rules.memory_bytes
    images, labels = batch
    per_batch_load = load_s_per_image * len(labels)
    twin = copy.deepcopy(model)  # timing moves BN statistics: the model itself stays as it is
    prepare_model(twin, accel)
    candidates, final_s = [], 0.0
    for depth in rules.depths:
        freezing.freeze_to_depth(twin, depth, bn)
        t = time_train_step(twin, images, labels, accel)
        per_image = t["forward_s"] / t["batch"]
        final_s = sizes.test * per_image
        step_s = t["step_s"] + per_batch_load
        epoch_s = sizes.steps_per_epoch * step_s + sizes.val * per_image + CHECKPOINT_S
        candidates.append(Candidate(depth, False, step_s, 0.0, epoch_s, epochs_that_fit(
            time_left_s, setup_s=0.0, epoch_s=epoch_s, final_s=final_s, max_epochs=sizes.max_epochs)))
        if boundary_cache == "never" or depth == 0:
            continue
        split, why = boundary.split_at_boundary(twin, accel.images(images[:2]))
        need = 0 if split is None else split.bytes_per_image() * (sizes.train * sizes.views + sizes.val)
        if split is None or (need > BOUNDARY_MEMORY_SHARE * memory_bytes and boundary_cache == "auto"):
            candidates[-1].note = why if split is None else (
                f"boundary cache not used: {need / 2**20:.0f} MB > {BOUNDARY_MEMORY_SHARE:.0%} of the memory budget")
            continue
        twin.eval()
        begin = budget.now()
        acts = split.capture(accel.images(images))
        capture_s = (budget.now() - begin) / len(labels)
        top = time_train_step(split.top, acts, labels, accel)
        cached = sizes.train * sizes.views + sizes.val  # images through the prefix
        setup_s = (sizes.views + 1) * PASS_START_S + SETUP_FACTOR * cached * (capture_s + load_s_per_image)
        top_epoch_s = (sizes.steps_per_epoch * top["step_s"] + sizes.val * top["forward_s"] / top["batch"]
                       + CHECKPOINT_S)
        candidates.append(Candidate(depth, True, top["step_s"], setup_s, top_epoch_s, epochs_that_fit(
            time_left_s, setup_s=setup_s, epoch_s=top_epoch_s, final_s=final_s, max_epochs=sizes.max_epochs),
            note=why))
    del twin
    return choose(candidates, time_left_s, min(rules.min_epochs, sizes.max_epochs))


def choose(candidates: list[Candidate], time_left_s: float, min_epochs: int) -> Plan:
    """The deepest candidate fitting `min_epochs` (at one depth, the variant that fits more epochs; `trainer.epochs`
    below `min_epochs` lowers it to that count)."""
    fitting = [c for c in candidates if c.epochs_fit >= min_epochs]
    if not fitting:
        most = max(candidates, key=lambda c: c.epochs_fit, default=None)
        why = (f"no fine-tune fits {min_epochs} epochs in the {time_left_s:.0f} s left"
               + (f" (at most {most.epochs_fit} at freeze depth {most.freeze_depth})" if most else "")
               + ": the probe is kept and the rest of the budget is given back")
        return Plan(None, candidates, time_left_s, min_epochs, why)
    depth = min(c.freeze_depth for c in fitting)
    chosen = max((c for c in fitting if c.freeze_depth == depth), key=lambda c: c.epochs_fit)
    why = (f"freeze depth {chosen.freeze_depth}{' on cached boundary activations' if chosen.boundary else ''}: "
           f"about {chosen.epochs_fit} epochs fit in the {time_left_s:.0f} s left (>= {min_epochs}), the deepest "
           f"candidate that does")
    return Plan(chosen, candidates, time_left_s, min_epochs, why)


def budget_record(*, limit: str, probe: Probe | None, plan: Plan | None, fit: dict | None, history: list[dict],
                  monitor: str, selection: Selection) -> dict:
    """decision.json `budget`: what auto tried in the budget, for how long, what it kept and why."""
    tried = []
    if probe is not None and not probe.info.get("resumed"):
        tried.append({"what": "probe", "val": probe.info.get(f"val_{monitor}"), "seconds": probe.info.get("seconds"),
                      "epochs": probe.info.get("epochs")})
    if fit is not None:
        seconds = None if fit.get("loop_end_s") is None or fit.get("spent_before_training_s") is None else round(
            fit["loop_end_s"] - fit["spent_before_training_s"], 1)
        tried.append({"what": "fine-tune", "epochs_run": fit.get("epochs_run"),
                      "planned_epochs": fit.get("planned_epochs"), "stopped": fit.get("stopped"), "seconds": seconds,
                      "val_per_epoch": [h.get(f"val_{monitor}") for h in history]})
    return {"limit": limit, "tried": tried, "plan": plan.record() if plan else None, "kept": selection.kept,
            "why": selection.why, "finetune_vs_probe": selection.finetune_vs_probe, "ensemble": selection.ensemble,
            "gave_back_s": None if fit is not None or plan is None else round(plan.time_left_s, 1)}


def budget_paragraph(record: dict | None) -> list[str]:
    """summary.md: the time budget's use, after the decision paragraph; [] without a budget."""
    if not record:
        return []
    lines = ["", f"Time budget `trainer.time_limit={record['limit']}`:"]
    for t in record["tried"]:
        if t["what"] == "probe":
            lines.append(f"- the linear probe on cached features: val {_num(t['val'])} in {_num(t['seconds'])} s "
                         f"({t['epochs']} head epochs)")
        else:
            lines.append(f"- the fine-tune: {t['epochs_run']} epoch(s) of {t['planned_epochs']} planned in "
                         f"{_num(t['seconds'])} s (stopped: {t['stopped']}), val per epoch "
                         f"{', '.join(_num(v) for v in t['val_per_epoch']) or 'none'}")
    if record.get("plan"):
        lines.append(f"- plan: {record['plan']['why']}")
    lines.append(f"- kept: **{record['kept']}**: {record['why']}.")
    ens = record.get("ensemble")
    if ens:
        verdict = ("shipped: it runs both backbones, twice the inference cost" if ens["shipped"] else
                   "not shipped: strategy.auto.ensemble=false" if ens["better_than_kept"] else "not shipped")
        lines.append(f"- the probe + fine-tune ensemble: val {_num(ens['challenger'])} "
                     f"({'better' if ens['better_than_kept'] else 'not better'} than the "
                     f"{'model it replaced' if ens['shipped'] else 'kept model'}, p = {ens['p_not_better']:.3f}; "
                     f"{verdict})")
    return lines


def _num(v) -> str:
    if not isinstance(v, float):
        return "n/a" if v is None else str(v)
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


@dataclass
class Settings:
    """The knobs auto's budget reads (train.py builds it from `strategy.auto.*` and `trainer.*`)."""
    time_limit: str
    monitor: str
    min_epochs: int
    select_alpha: float
    similar_freeze_depth: int
    shallow_unfreeze: int
    bn: str
    boundary_cache: str  # "never" where the run's settings rule it out (training/boundary.py boundary_blocker)
    boundary_views: int
    ship_ensemble: bool  # strategy.auto.ensemble: the ensemble may replace the kept model
    max_train_batches: int
    max_epochs: int
    seed: int


@dataclass
class Job:
    """The run's model and data, and the run set-up's steps auto's budget drives (train.py):
    `fit_probe()` fits and installs the probe head; `fit_finetune(boundary)` runs the fine-tune fit (a
    BoundarySplit or None) and returns its result; `timed_batch()` gives one train batch and the loader's seconds
    per image (or None); `eval_loss` scores the test split where the probe stays `best`."""
    model: torch.nn.Module
    splits: folder.DatasetSplits
    run_dir: Path
    meta: dict
    accel: Accel
    resumed: bool
    started: float
    fit_probe: Callable[[], Probe]
    fit_finetune: Callable[[boundary.BoundarySplit | None], FitResult]
    timed_batch: Callable[[], tuple[tuple[torch.Tensor, torch.Tensor], float] | None]
    eval_loss: Callable
    final_images: int = 0  # eval images' worth of work after the loop: the test split and the final checks


def run(settings: Settings, decision: dict, job: Job) -> tuple[FitResult, dict]:
    """Probe, plan, fine-tune and select (module doc). Returns (the fit result as train.py uses it, the strategy's
    update: freeze depth and trainable params where a fine-tune ran); decision.json gets `budget`."""
    s, probe, plan = settings, None, None
    if not job.resumed:
        own_head = {k: v.detach().clone() for k, v in job.model.get_classifier().state_dict().items()}
        probe = job.fit_probe()
        probe.info["role"] = "fallback"
        if distributed.is_main():
            selecting.save_probe(job.run_dir, job.model, job.meta, probe)
        job.model.get_classifier().load_state_dict(own_head)  # the fine-tune starts as the fixed mode's does
    got = job.timed_batch()
    if job.resumed:  # the plan was made once: decision.json
        plan_record = ((decision.get("budget") or {}).get("plan") or {})
        chosen = Candidate(**plan_record["chosen"]) if plan_record.get("chosen") else None
    else:
        plan = distributed.from_main(lambda: _make_plan(s, decision, job, got))
        chosen = plan.chosen
        _logger.info("Auto under trainer.time_limit=%s: %s", s.time_limit, plan.why)
        if chosen is not None:  # before the fine-tune: a resumed run continues this plan
            decision.update(freeze_depth=chosen.freeze_depth, budget={"limit": s.time_limit, "plan": plan.record()})
            if distributed.is_main():
                write_json(Path(job.run_dir) / "decision.json", decision)
    result, fit_report, strategy = None, None, {}
    if chosen is not None:
        info = freezing.apply_strategy(job.model, mode="partial" if chosen.freeze_depth else "finetune",
                                       freeze_depth=chosen.freeze_depth, bn=s.bn)
        strategy = {k: info[k] for k in ("freeze_depth", "final_freeze_depth", "trainable_params", "groups")}
        decision["freeze_depth"] = chosen.freeze_depth
        split = None
        if chosen.boundary and got is not None:
            split, why = boundary.split_at_boundary(job.model, job.accel.images(got[0][0][:2]))
            if split is None:
                _logger.info("Boundary cache not used (%s): the fine-tune reads images", why)
        result = job.fit_finetune(split)
        fit_report = result.budget.report() if result.budget is not None else None
    probe_val = probe.best_val if probe is not None else selecting.load_probe_val(job.run_dir)
    selection, result = _select(s, job, probe_val, result)
    previous = decision.get("budget") or {}
    decision["budget"] = budget_record(limit=s.time_limit, probe=probe, plan=plan, fit=fit_report,
                                       history=result.history, monitor=s.monitor, selection=selection)
    if plan is None:
        decision["budget"]["plan"] = previous.get("plan")
    _logger.info("Auto under trainer.time_limit: kept the %s (%s)", selection.kept, selection.why)
    if distributed.is_main():
        write_json(Path(job.run_dir) / "decision.json", decision)
    return result, strategy


def _select(s: Settings, job: Job, probe_val, result: FitResult | None) -> tuple[Selection, FitResult]:
    """Step 3 (budgeted/selection.py) and what it makes `best`: the probe, the fine-tune's epoch or the ensemble."""
    ft_val = result.best_val if result is not None and result.best_epoch else None
    if probe_val is None:  # a resumed run without the probe's logits: the fine-tune stands
        return Selection("fine-tune", "the probe's val logits are missing (resumed run)", None, None), result
    selection = selecting.select(tuple(probe_val), ft_val, monitor=s.monitor, alpha=s.select_alpha,
                                 ship_ensemble=s.ship_ensemble, seed=s.seed)
    if selection.kept == "probe":
        if distributed.is_main():
            selecting.promote_probe(job.run_dir)
        result = _probe_result(job.eval_loss, probe_val, result)
    elif selection.kept == "ensemble":
        if distributed.is_main():
            selecting.ship_ensemble(job.run_dir, selection, lambda logits, labels: loop.score_logits(
                logits, labels, job.eval_loss, len(job.splits.classes)))
        result = replace(result, best_val=selection.ensemble_val, eval_loss=job.eval_loss)
    return selection, result


def _probe_result(eval_loss, probe_val, result: FitResult | None) -> FitResult:
    """The fit result with the probe as `best` (epoch 0): the fine-tune's history stays for the record."""
    kept = FitResult([], 0, eval_loss, tuple(probe_val)) if result is None else result
    return replace(kept, best_epoch=0, best_val=tuple(probe_val), eval_loss=eval_loss, weight_averaging=None)


def _make_plan(s: Settings, decision: dict, job: Job, got) -> Plan:
    depths = candidate_depths(decision, similar_freeze_depth=s.similar_freeze_depth,
                              shallow_unfreeze=s.shallow_unfreeze)
    time_left = parse_duration("trainer.time_limit", s.time_limit) - (budget.now() - job.started)
    if got is None or not depths:
        return Plan(None, [], time_left, s.min_epochs, "no train batch decoded: the probe is kept")
    batch, load_s = got
    steps = min(math.ceil(len(job.splits.train) / len(batch[1])), s.max_train_batches or math.inf)
    sizes = Sizes(len(job.splits.train), len(job.splits.val), job.final_images, steps, s.boundary_views, s.max_epochs)
    rules = PlanRules(depths, s.bn, s.boundary_cache, memory_budget().per_rank, s.min_epochs)
    return plan_finetune(job.model, batch, rules=rules, accel=job.accel, sizes=sizes, time_left_s=time_left,
                         load_s_per_image=load_s)
