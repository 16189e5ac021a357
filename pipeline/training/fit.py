"""Fine-tuning fit: the epoch loop with best-checkpoint selection, early stopping, gradual thaws, resume and
a clean stop on SIGINT/SIGTERM, `trainer.time_limit` (training/budget.py) and `trainer.ema` (training/averaging.py).
(The cached linear probe has its own fit: features/cached_fit.py.)"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.model import checkpoint, freezing
from pipeline.runtime import distributed
from pipeline.runtime.devices import build_accel, prepare_model
from pipeline.training import averaging, budget, interrupts, loop, loss, mixing, resume, tracking
from pipeline.training.guard import StepGuard
from pipeline.training.metrics import MonitorTracker
from pipeline.transfer import gradual, optim

_logger = logging.getLogger(__name__)


def maybe_thaw(model, optimizer, scheduler, cfg: DictConfig, epoch: int) -> None:
    """`strategy.mode=gradual`: thaw layer groups from the top at this epoch's scheduled depth."""
    s, o = cfg.strategy, cfg.optim
    if s.mode != "gradual":
        return
    n_groups = len(freezing.layer_groups(model))
    floor = freezing.resolve_freeze_depth("partial", s.freeze_depth, n_groups)
    depth = gradual.gradual_depth(epoch, n_groups=n_groups, floor=floor, warmup_epochs=s.warmup_epochs,
                                  every=s.unfreeze_every, groups_per_step=s.unfreeze_groups)
    trainable_groups = [any(p.requires_grad for n, p in model.named_parameters() if n in set(g))
                        for g in freezing.layer_groups(model)]
    current = trainable_groups.index(True) if any(trainable_groups) else n_groups
    if depth < current:
        gradual.thaw_to_depth(model, optimizer, depth, bn=s.bn, lr=o.lr, backbone_lr_mult=o.backbone_lr_mult,
                              layer_decay=o.layer_decay, weight_decay=o.weight_decay)
        scheduler.refresh()


def fit(model, loaders: dict, cfg: DictConfig, run_dir: Path, meta: dict, device: torch.device,
        class_weights: torch.Tensor | None = None, resume_state: dict | None = None,
        stop: interrupts.GracefulStop | None = None, accel=None, started: float | None = None,
        test_images: int = 0, net: torch.nn.Module | None = None) -> dict:
    """Epoch loop with best-checkpoint selection and early stopping on `trainer.monitor`.

    Writes `last.pt` after every epoch (mid-epoch once `stop()` is set by SIGINT/SIGTERM, then raises
    TrainingInterrupted) and continues from `resume_state` (training/resume.py); NaN/inf: training/guard.py.
    Each epoch's history row carries `lr_<group>`; training/tracking.py writes history.csv, TensorBoard, MLflow.
    `trainer.time_limit`: a TimeBudget (counting from `started`, a budget.now() reading; `test_images` sizes the
    time kept for the test evaluation) plans the epochs, spans the LR schedule over them and ends an epoch early
    at the limit. Returns history, best epoch, the eval loss, the best epoch's val (logits, labels) and the
    budget (None without a limit).

    `trainer.ema`: a weight average (training/averaging.py) follows every optimizer step and is evaluated on val
    beside the raw weights each epoch (history `ema_val_<metric>` next to the raw `val_<metric>`); the better of
    the two on `trainer.monitor` is the epoch's candidate for `best` (best.json `weights_source`: raw or ema) and
    the result's `weight_averaging` says which one the best epoch kept.

    `net`: the module a batch goes through when it is not `model` itself: the top of a boundary-cached partial
    fine-tune (training/boundary.py), whose loaders hold activations. It shares `model`'s parameters, and
    `model` is what the checkpoints hold."""
    t, o, max_epochs = cfg.trainer, cfg.optim, budget.max_epochs(cfg.trainer)
    accel = accel or build_accel(device, amp=t.amp, channels_last=t.channels_last)
    prepare_model(model, accel, compile_model=t.compile, cache_dir=Path(cfg.data_dir) / "cache" / "inductor")
    steps = len(loaders["train"]) if not t.max_train_batches else min(len(loaders["train"]), t.max_train_batches)
    optimizer, scheduler = build_optimization(model, o, steps_per_epoch=steps, epochs=max_epochs)
    val_images = len(loaders["val"].dataset) * (2 if t.ema else 1)  # EMA: two val evaluations per epoch
    clock = budget.from_config(t, started=started, steps_per_epoch=steps, val_images=val_images,
                               test_images=test_images,
                               on_plan=lambda epochs: scheduler.set_total_steps(epochs * steps))  # LR over the plan
    mix = mixing.build_mixer(cfg.augment, meta["num_classes"])  # mixup/cutmix: None when off
    loss_fn, eval_loss = loss.build_losses(cfg.loss, class_weights, device, soft_targets=mix is not None)
    tracker, history, best_val = MonitorTracker(t.monitor, t.early_stop_patience), [], None
    guard = StepGuard(t.max_nonfinite_steps, t.grad_clip)
    ema = averaging.WeightAverage(model, t.ema_decay) if t.ema else None  # of the unwrapped model: DDP re-wraps
    last = resume.LastCheckpoint(run_dir, cfg, model=model, optimizer=optimizer, scheduler=scheduler, tracker=tracker,
                                 guard=guard, loader=loaders["train"], scaler=accel.scaler, budget=clock,
                                 averager=ema)
    first, partial, stop = 1, None, stop or interrupts.GracefulStop()  # not entered: never set
    stop_all, ddp = distributed.agreed_stop(stop), None  # DDP: ranks stop at the same step; wrapper (re)built below
    halt = stop_all if clock is None else lambda: stop_all() or clock.after_step()  # signal first, then the budget
    if resume_state is not None:  # replay gradual thaws in order, so the optimizer groups match the saved ones
        for epoch in range(1, resume_state["epoch"] + 1 + bool(resume_state["partial"])):
            maybe_thaw(model, optimizer, scheduler, cfg, epoch)
        first, partial, history, best_val = last.restore(resume_state)
    with tracking.RunTracker(run_dir, cfg, first_epoch=first) as curves:  # history.csv, TensorBoard, MLflow
        for epoch in range(first, max_epochs + 1):
            if clock is not None and not clock.can_start_epoch(epoch):
                break
            maybe_thaw(model, optimizer, scheduler, cfg, epoch)
            ddp = distributed.wrap_ddp(net or model, device, current=ddp)  # new wrapper when a thaw changed trainables
            last.mark_epoch_start()
            if clock is not None:
                clock.start_epoch(epoch, done_steps=(partial or {}).get("steps", 0))
            stats = loop.train_one_epoch(ddp, loaders["train"], loss_fn, optimizer, scheduler, device,
                                           epoch=epoch, max_batches=t.max_train_batches, progress=t.progress,
                                           guard=guard, stop=halt, resume_from=partial, accel=accel,
                                           after_step=(lambda: ema.update(model)) if ema is not None else None,
                                           mix=mix)
            partial = None
            if stats.get("interrupted") and not (clock is not None and clock.stopped):  # SIGINT/SIGTERM
                last.save(epoch - 1, history, best_val, partial=stats["partial"])
                raise stop.interrupted(run_dir, f"at step {stats['partial']['steps']} of epoch {epoch}")
            if stats.get("interrupted"):  # the time limit ended the epoch early: evaluate it if there is time
                if best_val is not None and not clock.time_for_eval():
                    break
                stats = budget.partial_stats(stats["partial"])
            stats = distributed.reduce_train_stats(stats)
            with budget.measure(clock, "eval"):
                ev = evaluate_epoch(model, ema, loaders["val"], eval_loss, device, meta["num_classes"], t, accel,
                                    tracker.mode, net=net)
            history.append({"epoch": epoch, **stats, **{f"val_{k}": v for k, v in ev.raw.items()},
                            **({f"ema_val_{k}": v for k, v in ev.ema.items()} if ev.ema is not None else {}),
                            **tracking.group_lrs(optimizer)})  # each group's LR at the epoch's end
            guard.check_weights(model, optimizer, epoch)  # never save non-finite weights as `best` or `last`
            improved = tracker.update(ev.val[t.monitor], epoch)
            with budget.measure(clock, "checkpoint"):
                if improved:
                    best_val = ev.val_out
                    if distributed.is_main():  # the unwrapped model: loads without DDP
                        checkpoint.save_checkpoint(run_dir, "best", ev.weights,
                                                   {**meta, "epoch": epoch, "val_metrics": ev.val, **ev.meta})
                last.save(epoch, history, best_val)
            if clock is not None:
                clock.end_epoch(stats)  # the first epoch measured (train, eval, checkpoints) gives the plan
            curves.log(history)
            log_epoch(epoch, clock.planned if clock else max_epochs, stats, ev, history[-1].get("lr_head"), t.monitor,
                      improved)
            if stop_all():
                raise stop.interrupted(run_dir, f"at the end of epoch {epoch}")
            if clock is not None and clock.stopped:
                break
            if tracker.should_stop and epoch < max_epochs:
                stop_early(tracker, clock)
                break
    return fit_result(history, tracker, eval_loss, best_val, clock, ema)


def build_optimization(model, o: DictConfig, *, steps_per_epoch: int, epochs: int):
    """The optimizer over the trainable param groups (differential LRs, layer decay) and its LR schedule over
    `epochs` (a time budget re-spans it over its plan: TimeBudget on_plan)."""
    groups = optim.build_param_groups(model, lr=o.lr, backbone_lr_mult=o.backbone_lr_mult,
                                      layer_decay=o.layer_decay, weight_decay=o.weight_decay)
    optimizer = optim.build_optimizer(groups, name=o.name, lr=o.lr, momentum=o.momentum, fused=o.fused)
    scheduler = optim.build_scheduler(optimizer, name=o.scheduler, total_steps=steps_per_epoch * epochs,
                                      warmup_steps=int(o.warmup_epochs * steps_per_epoch))
    return optimizer, scheduler


def fit_result(history: list[dict], tracker: MonitorTracker, eval_loss, best_val, clock: budget.TimeBudget | None,
               ema: averaging.WeightAverage | None) -> dict:
    """fit()'s result (its docstring); closes the budget's accounting and logs how it was spent."""
    if clock is not None:
        clock.end_loop()
        _logger.info("Time budget %s: %d epoch(s) run (planned %s), stopped: %s%s", clock.limit, clock.epochs_run,
                     clock.planned, clock.stopped, f" ({clock.stopped_at})" if clock.stopped_at else "")
    result = {"history": history, "best_epoch": tracker.best_epoch, "eval_loss": eval_loss, "best_val": best_val,
              "budget": clock}
    if ema is not None:
        result["weight_averaging"] = averaging.record(history, tracker.best_epoch, tracker.name, tracker.mode,
                                                      ema.decay)
    return result


def stop_early(tracker: MonitorTracker, clock: budget.TimeBudget | None) -> None:
    """Log the early stop (`trainer.early_stop_patience`) and record it as the budget's stop reason."""
    _logger.info("Early stop: val %s has not improved for %d epoch(s) (best %.4f at epoch %d)",
                 tracker.name, tracker.bad_epochs, tracker.best, tracker.best_epoch)
    if clock is not None:
        clock.stopped = "early_stop"


@dataclass
class EpochEval:
    """One epoch on val: the raw weights' metrics, the EMA's (None without `trainer.ema`), and the epoch's
    candidate for `best` (the EMA where it is strictly better on the monitor): its weights, metrics, (logits,
    labels) and best.json extras (`weights_source`)."""
    raw: dict
    ema: dict | None
    weights: torch.nn.Module
    val: dict
    val_out: tuple
    meta: dict


def evaluate_epoch(model, ema: averaging.WeightAverage | None, loader, eval_loss, device: torch.device,
                   num_classes: int, t: DictConfig, accel, mode: str, net=None) -> EpochEval:
    """Evaluate the raw weights (and the EMA, if kept) on val and pick the epoch's candidate for `best`. `net`:
    the module the val batches go through, when not `model` (fit's docstring; no EMA then)."""
    val, *val_out = loop.evaluate(net or model, loader, eval_loss, device, num_classes, t.progress, "val", accel=accel)
    if ema is None:
        return EpochEval(val, None, model, val, tuple(val_out), {})
    ema_val, *ema_out = loop.evaluate(ema.module, loader, eval_loss, device, num_classes, t.progress, "val (ema)",
                                      accel=accel)
    if averaging.ema_wins(ema_val[t.monitor], val[t.monitor], mode):
        return EpochEval(val, ema_val, ema.module, ema_val, tuple(ema_out), {"weights_source": "ema"})
    return EpochEval(val, ema_val, model, val, tuple(val_out), {"weights_source": "raw"})


def log_epoch(epoch: int, planned: int, stats: dict, ev: EpochEval, lr: float | None, monitor: str,
              improved: bool) -> None:
    """The epoch's log line: the raw weights' val, the EMA's monitor value, and *best* when the epoch improved."""
    _logger.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  val_bal_acc %.4f  lr %.2e  "
                 "%.1f img/s%s%s", epoch, planned, stats["train_loss"], ev.raw["loss"], ev.raw["accuracy"],
                 ev.raw["balanced_accuracy"], float("nan") if lr is None else lr, stats["train_img_per_s"],
                 f"  ema val_{monitor} {ev.ema[monitor]:.4f}" if ev.ema is not None else "",
                 f"  *best*{' (ema)' if ev.meta.get('weights_source') == 'ema' else ''}" if improved else "")
