"""Fine-tuning fit: the epoch loop with best-checkpoint selection, early stopping, gradual thaws, resume and
a clean stop on SIGINT/SIGTERM, `trainer.time_limit` (training/budget.py) and `trainer.ema` (training/averaging.py).
`fit` runs an EpochLoop: its set-up builds the loop's parts, `run_epoch` trains, evaluates and saves one epoch.
(The cached linear probe has its own fit: features/cached_fit.py.)"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config.schema import (
    AugmentConfig,
    DistillConfig,
    LossConfig,
    OptimConfig,
    StrategyConfig,
    TrainerConfig,
)
from pipeline.model import checkpoint, freezing
from pipeline.runtime import distributed
from pipeline.runtime.devices import Accel, prepare_model
from pipeline.training import averaging, budget, distill, interrupts, loop, loss, mixing, resume, tracking
from pipeline.training.guard import StepGuard
from pipeline.training.metrics import MonitorTracker
from pipeline.transfer import gradual, optim

_logger = logging.getLogger(__name__)


def maybe_thaw(model, optimizer, scheduler, epoch: int, *, strategy: StrategyConfig, optim: OptimConfig) -> None:
    """`strategy.mode=gradual`: thaw layer groups from the top at this epoch's scheduled depth."""
    if strategy.mode != "gradual":
        return
    n_groups = len(freezing.layer_groups(model))
    floor = freezing.resolve_freeze_depth("partial", strategy.freeze_depth, n_groups)
    depth = gradual.gradual_depth(epoch, n_groups=n_groups, floor=floor, warmup_epochs=strategy.warmup_epochs,
                                  every=strategy.unfreeze_every, groups_per_step=strategy.unfreeze_groups)
    trainable_groups = [any(p.requires_grad for n, p in model.named_parameters() if n in set(g))
                        for g in freezing.layer_groups(model)]
    current = trainable_groups.index(True) if any(trainable_groups) else n_groups
    if depth < current:
        gradual.thaw_to_depth(model, optimizer, depth, bn=strategy.bn, optim=optim)
        scheduler.refresh()


@dataclass
class FitResult:
    """What a fit hands on (this fit, the cached probe's and auto's under a time limit): the epoch `history`, the
    `best_epoch` (0: auto's probe stayed `best`), the `eval_loss`, the best epoch's val `(logits, labels)`."""
    history: list[dict]
    best_epoch: int
    eval_loss: object
    best_val: tuple | None
    budget: budget.TimeBudget | None = None  # trainer.time_limit: the clock, its plan and where the time went
    weight_averaging: dict | None = None  # trainer.ema: which weights the best epoch kept (averaging.record)
    features: dict | None = None  # the cached probe: features.json's record
    rows: dict | None = None  # the cached probe: {split: the split index of each row of best_val}
    calibration: dict | None = None  # set after the fit (training/calibration.py calibrate_run)


@dataclass(frozen=True)
class FitSettings:
    """What the fit reads of the config: its groups (schema nodes, e.g. `cfg.trainer`) and where torch.compile
    keeps its inductor cache (`<data_dir>/cache/inductor`)."""
    trainer: TrainerConfig
    optim: OptimConfig
    strategy: StrategyConfig
    augment: AugmentConfig
    loss: LossConfig
    compile_cache_dir: Path
    distill: DistillConfig | None = None  # distill.teacher set: the KD loss (training/distill.py)


@dataclass(frozen=True)
class FitRun:
    """The run the fit belongs to: its dir; the checkpoint meta (`num_classes`; `config`, the resolved config as
    a plain dict, which last.pt and MLflow keep); the last.pt state to continue (training/resume.py); the
    SIGINT/SIGTERM stop (training/interrupts.py); when the run started (a budget.now() reading: the time limit
    counts from it) and the test split's size (the time budget keeps time for its evaluation)."""
    run_dir: Path
    meta: dict
    resume_state: dict | None = None
    stop: interrupts.GracefulStop | None = None
    started: float | None = None
    test_images: int = 0


def fit(model, loaders: dict, settings: FitSettings, run: FitRun, *, accel: Accel,
        class_weights: torch.Tensor | None = None, net: torch.nn.Module | None = None) -> FitResult:
    """Epoch loop with best-checkpoint selection and early stopping on `trainer.monitor`.

    Writes `last.pt` after every epoch (mid-epoch once `run.stop()` is set by SIGINT/SIGTERM, then raises
    TrainingInterrupted) and continues from `run.resume_state` (training/resume.py); NaN/inf: training/guard.py.
    Each epoch's history row carries `lr_<group>`; training/tracking.py writes history.csv, TensorBoard, MLflow.
    `trainer.time_limit`: a TimeBudget (counting from `run.started`; `run.test_images` sizes the time kept for the
    test evaluation) plans the epochs, spans the LR schedule over them and ends an epoch early at the limit.
    Returns a FitResult: history, best epoch, the eval loss, the best epoch's val (logits, labels) and the budget
    (None without a limit).

    `trainer.ema`: a weight average (training/averaging.py) follows every optimizer step and is evaluated on val
    beside the raw weights each epoch (history `ema_val_<metric>` next to the raw `val_<metric>`); the better of
    the two on `trainer.monitor` is the epoch's candidate for `best` (best.json `weights_source`: raw or ema) and
    the result's `weight_averaging` says which one the best epoch kept.

    `net`: the module a batch goes through when it is not `model` itself: the top of a boundary-cached partial
    fine-tune (training/boundary.py), whose loaders hold activations. It shares `model`'s parameters, and
    `model` is what the checkpoints hold."""
    epochs = EpochLoop(model, loaders, settings, run, accel=accel, class_weights=class_weights, net=net)
    if run.resume_state is not None:
        epochs.restore(run.resume_state)
    with tracking.RunTracker(run.run_dir, settings.trainer, run.meta["config"], first_epoch=epochs.first) as curves:
        for epoch in range(epochs.first, epochs.max_epochs + 1):
            if not epochs.run_epoch(epoch, curves):
                break
    return fit_result(epochs.history, epochs.tracker, epochs.eval_loss, epochs.best_val, epochs.clock, epochs.ema)


class EpochLoop:
    """One fit's parts and progress. The set-up (`__init__`) prepares the model (channels_last, torch.compile) and
    builds the optimizer and LR schedule, the time budget, the batch mixer and losses, the monitor tracker, the
    NaN guard, the weight average and last.pt; `restore` continues a saved state; `run_epoch` runs one epoch."""

    def __init__(self, model, loaders: dict, settings: FitSettings, run: FitRun, *, accel: Accel,
                 class_weights: torch.Tensor | None = None, net: torch.nn.Module | None = None):
        t, self.max_epochs = settings.trainer, budget.max_epochs(settings.trainer.epochs)
        self.model, self.net, self.loaders, self.accel = model, net, loaders, accel
        self.settings, self.run = settings, run
        prepare_model(model, accel, compile_model=t.compile, cache_dir=settings.compile_cache_dir)
        steps = len(loaders["train"]) if not t.max_train_batches else min(len(loaders["train"]), t.max_train_batches)
        optimizer, scheduler = build_optimization(model, settings.optim, steps_per_epoch=steps, epochs=self.max_epochs)
        val_images = len(loaders["val"].dataset) * (2 if t.ema else 1)  # EMA: two val evaluations per epoch
        clock = budget.from_config(t, started=run.started, steps_per_epoch=steps, val_images=val_images,
                                   test_images=run.test_images,
                                   on_plan=lambda epochs: scheduler.set_total_steps(epochs * steps))  # LR over the plan
        mix = mixing.build_mixer(settings.augment, run.meta["num_classes"])  # mixup/cutmix: None when off
        loss_fn, self.eval_loss = loss.build_losses(settings.loss, class_weights, accel.device,
                                                    soft_targets=mix is not None)
        if settings.distill is not None:
            loss_fn = distill.wrap_loss(loss_fn, settings.distill)  # the label loss plus the teacher's, when taught
        tracker, self.history, self.best_val = MonitorTracker(t.monitor, t.early_stop_patience), [], None
        guard = StepGuard(t.max_nonfinite_steps, t.grad_clip)
        ema = averaging.WeightAverage(model, t.ema_decay) if t.ema else None  # of the unwrapped model: DDP re-wraps
        self.optimizer, self.scheduler, self.clock, self.tracker, self.guard, self.ema = \
            optimizer, scheduler, clock, tracker, guard, ema
        self.last = resume.LastCheckpoint(run.run_dir, run.meta["config"], resume.Resumable(
            model, optimizer, scheduler, tracker, guard, loaders["train"], scaler=accel.scaler, budget=clock,
            averager=ema))
        self.first, self.partial, self.stop = 1, None, run.stop or interrupts.GracefulStop()  # not entered: never set
        self.stop_all, self.ddp = distributed.agreed_stop(self.stop), None  # DDP: ranks stop at the same step
        halt = self.stop_all if clock is None else lambda: self.stop_all() or clock.after_step()  # signal, then budget
        self.step = loop.TrainStep(loss_fn, optimizer, scheduler, accel, guard=guard, mix=mix, stop=halt,
                                   after_step=(lambda: ema.update(model)) if ema is not None else None)

    def thaw(self, epoch: int) -> None:
        maybe_thaw(self.model, self.optimizer, self.scheduler, epoch, strategy=self.settings.strategy,
                   optim=self.settings.optim)

    def restore(self, state: dict) -> None:
        """Continue a last.pt state: the gradual thaws replayed in order (so the optimizer groups match the saved
        ones), then the state loaded; the loop starts at `first`, from the `partial` epoch's counters."""
        for epoch in range(1, state["epoch"] + 1 + bool(state["partial"])):
            self.thaw(epoch)
        self.first, self.partial, self.history, self.best_val = self.last.restore(state)

    def run_epoch(self, epoch: int, curves: tracking.RunTracker) -> bool:
        """Train, evaluate and save epoch `epoch`; False when the loop ends here (time budget, early stop). Raises
        TrainingInterrupted on SIGINT/SIGTERM."""
        t, clock = self.settings.trainer, self.clock
        if clock is not None and not clock.can_start_epoch(epoch):
            return False
        stats = self.train(epoch)
        if stats is None:
            return False
        with budget.measure(clock, "eval"):
            ev = self.evaluate()
        self.history.append({"epoch": epoch, **stats, **{f"val_{k}": v for k, v in ev.raw.items()},
                             **({f"ema_val_{k}": v for k, v in ev.ema.items()} if ev.ema is not None else {}),
                             **tracking.group_lrs(self.optimizer)})  # each group's LR at the epoch's end
        self.guard.check_weights(self.model, self.optimizer, epoch)  # never save non-finite weights as best or last
        improved = self.tracker.update(ev.val[t.monitor], epoch)
        with budget.measure(clock, "checkpoint"):
            self.save(epoch, ev, improved)
        if clock is not None:
            clock.end_epoch(stats)  # the first epoch measured (train, eval, checkpoints) gives the plan
        curves.log(self.history)
        log_epoch(epoch, clock.planned if clock else self.max_epochs, stats, ev, self.history[-1].get("lr_head"),
                  t.monitor, improved)
        if self.stop_all():
            raise self.stop.interrupted(self.run.run_dir, f"at the end of epoch {epoch}")
        if clock is not None and clock.stopped:
            return False
        if self.tracker.should_stop and epoch < self.max_epochs:
            stop_early(self.tracker, clock)
            return False
        return True

    def train(self, epoch: int) -> dict | None:
        """Train epoch `epoch` (from the `partial` counters of a resumed one): its train stats, or None when the time
        limit ended it with no time left to evaluate it. SIGINT/SIGTERM: saves last.pt mid-epoch and raises."""
        t, clock = self.settings.trainer, self.clock
        self.thaw(epoch)
        self.ddp = distributed.wrap_ddp(self.net or self.model, self.accel.device,
                                        current=self.ddp)  # new wrapper when a thaw changed trainables
        self.last.mark_epoch_start()
        if clock is not None:
            clock.start_epoch(epoch, done_steps=(self.partial or {}).get("steps", 0))
        stats = loop.train_one_epoch(self.ddp, self.loaders["train"], self.step, epoch=epoch,
                                     max_batches=t.max_train_batches, progress=t.progress, resume_from=self.partial)
        self.partial = None
        if stats.get("interrupted") and not (clock is not None and clock.stopped):  # SIGINT/SIGTERM
            self.last.save(epoch - 1, self.history, self.best_val, partial=stats["partial"])
            raise self.stop.interrupted(self.run.run_dir, f"at step {stats['partial']['steps']} of epoch {epoch}")
        if stats.get("interrupted"):  # the time limit ended the epoch early: evaluate it if there is time
            if self.best_val is not None and not clock.time_for_eval():
                return None
            stats = budget.partial_stats(stats["partial"])
        return distributed.reduce_train_stats(stats)

    def evaluate(self) -> EpochEval:
        """Evaluate the raw weights (and the EMA, if kept) on val and pick the epoch's candidate for `best`. The val
        batches go through `net` when there is one (fit's docstring; no EMA then)."""
        t, model, ema = self.settings.trainer, self.model, self.ema

        def on_val(module: torch.nn.Module, desc: str):
            return loop.evaluate(module, self.loaders["val"], self.eval_loss, self.accel, self.run.meta["num_classes"],
                                 progress=t.progress, desc=desc)

        val, *val_out = on_val(self.net or model, "val")
        if ema is None:
            return EpochEval(val, None, model, val, tuple(val_out), {})
        ema_val, *ema_out = on_val(ema.module, "val (ema)")
        if averaging.ema_wins(ema_val[t.monitor], val[t.monitor], self.tracker.mode):
            return EpochEval(val, ema_val, ema.module, ema_val, tuple(ema_out), {"weights_source": "ema"})
        return EpochEval(val, ema_val, model, val, tuple(val_out), {"weights_source": "raw"})

    def save(self, epoch: int, ev: EpochEval, improved: bool) -> None:
        """`best` when the epoch improved on the monitor (rank 0, the unwrapped model: it loads without DDP), then
        last.pt."""
        if improved:
            self.best_val = ev.val_out
            if distributed.is_main():
                checkpoint.save_checkpoint(self.run.run_dir, "best", ev.weights,
                                           {**self.run.meta, "epoch": epoch, "val_metrics": ev.val, **ev.meta})
        self.last.save(epoch, self.history, self.best_val)


def build_optimization(model, o: OptimConfig, *, steps_per_epoch: int, epochs: int):
    """The optimizer over the trainable param groups (differential LRs, layer decay) and its LR schedule over
    `epochs` (a time budget re-spans it over its plan: TimeBudget on_plan)."""
    groups = optim.build_param_groups(model, lr=o.lr, backbone_lr_mult=o.backbone_lr_mult,
                                      layer_decay=o.layer_decay, weight_decay=o.weight_decay)
    optimizer = optim.build_optimizer(groups, name=o.name, lr=o.lr, momentum=o.momentum, fused=o.fused)
    scheduler = optim.build_scheduler(optimizer, name=o.scheduler, total_steps=steps_per_epoch * epochs,
                                      warmup_steps=int(o.warmup_epochs * steps_per_epoch))
    return optimizer, scheduler


def fit_result(history: list[dict], tracker: MonitorTracker, eval_loss, best_val, clock: budget.TimeBudget | None,
               ema: averaging.WeightAverage | None) -> FitResult:
    """fit()'s result (its docstring); closes the budget's accounting and logs how it was spent."""
    if clock is not None:
        clock.end_loop()
        _logger.info("Time budget %s: %d epoch(s) run (planned %s), stopped: %s%s", clock.limit, clock.epochs_run,
                     clock.planned, clock.stopped, f" ({clock.stopped_at})" if clock.stopped_at else "")
    averaged = None if ema is None else averaging.record(history, tracker.best_epoch, tracker.name, tracker.mode,
                                                          ema.decay)
    return FitResult(history, tracker.best_epoch, eval_loss, best_val, budget=clock, weight_averaging=averaged)


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


def log_epoch(epoch: int, planned: int, stats: dict, ev: EpochEval, lr: float | None, monitor: str,
              improved: bool) -> None:
    """The epoch's log line: the raw weights' val, the EMA's monitor value, and *best* when the epoch improved."""
    _logger.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  val_bal_acc %.4f  lr %.2e  "
                 "%.1f img/s%s%s", epoch, planned, stats["train_loss"], ev.raw["loss"], ev.raw["accuracy"],
                 ev.raw["balanced_accuracy"], float("nan") if lr is None else lr, stats["train_img_per_s"],
                 f"  ema val_{monitor} {ev.ema[monitor]:.4f}" if ev.ema is not None else "",
                 f"  *best*{' (ema)' if ev.meta.get('weights_source') == 'ema' else ''}" if improved else "")
