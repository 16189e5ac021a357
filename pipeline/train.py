"""Entry point: `python -m pipeline.train [overrides]`. `train(cfg)` runs one job and returns its metrics."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError, PipelineError, exit_on_user_error  # noqa: F401  (re-exported)
from pipeline import audit, augment, backbone, cached_fit, checkpoint, data, engine, loss, optim, summary
from pipeline.accel import build_accel, prepare_model, select_device
from pipeline import distributed, resume, validate
from pipeline.guard import StepGuard
from pipeline.seeding import seed_everything, seed_transform
from pipeline.config import register_configs
from pipeline.metrics import MonitorTracker
from pipeline.startup import set_threads
from pipeline.stages import (RUNTIME_SKIP_LOG, build_data, build_image_cache, checkpoint_meta, make_loader,  # noqa: F401
                             maybe_thaw, resolve_run_dir, setup_imbalance, setup_strategy, write_eval_reports)

_logger = logging.getLogger(__name__)
_STRATEGY_KEYS = ("mode", "freeze_depth", "final_freeze_depth", "n_groups", "trainable_params", "total_params",
                  "decision", "features")


def fit(model, loaders: dict, cfg: DictConfig, run_dir: Path, meta: dict, device: torch.device,
        class_weights: torch.Tensor | None = None, resume_state: dict | None = None,
        stop: resume.GracefulStop | None = None, accel=None) -> dict:
    """Epoch loop with best-checkpoint selection and early stopping on `trainer.monitor`.

    Writes `last.pt` after every epoch (mid-epoch once `stop()` is set by SIGINT/SIGTERM, then raises
    TrainingInterrupted) and continues from `resume_state` (pipeline/resume.py); NaN/inf: pipeline/guard.py.
    Returns history, best epoch, the eval loss and the best epoch's val (logits, labels)."""
    t, o = cfg.trainer, cfg.optim
    if t.epochs <= 0 or t.batch_size <= 0:
        raise ConfigError(f"trainer.epochs={t.epochs} and trainer.batch_size={t.batch_size} must be positive")
    accel = accel or build_accel(device, amp=t.amp, channels_last=t.channels_last)
    prepare_model(model, accel, compile_model=t.compile, cache_dir=Path(cfg.data_dir) / "cache" / "inductor")
    groups = optim.build_param_groups(model, lr=o.lr, backbone_lr_mult=o.backbone_lr_mult,
                                      layer_decay=o.layer_decay, weight_decay=o.weight_decay)
    optimizer = optim.build_optimizer(groups, name=o.name, lr=o.lr, momentum=o.momentum, fused=o.fused)
    steps = len(loaders["train"]) if not t.max_train_batches else min(len(loaders["train"]), t.max_train_batches)
    scheduler = optim.build_scheduler(optimizer, name=o.scheduler, total_steps=steps * t.epochs,
                                      warmup_steps=int(o.warmup_epochs * steps))
    c = cfg.loss
    loss_fn = loss.build_loss(name=c.name, label_smoothing=c.label_smoothing, gamma=c.gamma,
                              class_weights=None if class_weights is None else class_weights.to(device))
    eval_loss = loss.build_loss(name=c.name, gamma=c.gamma, class_weights=class_weights)  # on CPU logits
    tracker, history, best_val = MonitorTracker(t.monitor, t.early_stop_patience), [], None
    guard = StepGuard(t.max_nonfinite_steps, t.grad_clip)
    last = resume.LastCheckpoint(run_dir, cfg, model=model, optimizer=optimizer, scheduler=scheduler, tracker=tracker,
                                 guard=guard, loader=loaders["train"], scaler=accel.scaler)
    first, partial, stop = 1, None, stop or resume.GracefulStop()  # not entered: never set
    stop_all, ddp = distributed.agreed_stop(stop), None  # DDP: ranks stop at the same step; wrapper (re)built below
    if resume_state is not None:  # replay gradual thaws in order, so the optimizer groups match the saved ones
        for epoch in range(1, resume_state["epoch"] + 1 + bool(resume_state["partial"])):
            maybe_thaw(model, optimizer, scheduler, cfg, epoch)
        first, partial, history, best_val = last.restore(resume_state)
    for epoch in range(first, t.epochs + 1):
        maybe_thaw(model, optimizer, scheduler, cfg, epoch)
        ddp = distributed.wrap_ddp(model, device, current=ddp)  # new wrapper when a thaw changed the trainables
        last.mark_epoch_start()
        stats = engine.train_one_epoch(ddp, loaders["train"], loss_fn, optimizer, scheduler, device,
                                       epoch=epoch, max_batches=t.max_train_batches, progress=t.progress,
                                       guard=guard, stop=stop_all, resume_from=partial, accel=accel)
        stats, partial = distributed.reduce_train_stats(stats), None
        if stats.get("interrupted"):
            last.save(epoch - 1, history, best_val, partial=stats["partial"])
            raise stop.interrupted(run_dir, epoch, f"at step {stats['partial']['steps']}")
        val, *val_out = engine.evaluate(model, loaders["val"], eval_loss, device, meta["num_classes"], t.progress,
                                        "val", accel=accel)
        history.append({"epoch": epoch, **stats, **{f"val_{k}": v for k, v in val.items()}})
        guard.check_weights(model, optimizer, epoch)  # never save non-finite weights as `best` or `last`
        improved = tracker.update(val[t.monitor], epoch)
        if improved:
            best_val = tuple(val_out)
            if distributed.is_main():  # the unwrapped model: loads without DDP
                checkpoint.save_checkpoint(run_dir, "best", model, {**meta, "epoch": epoch, "val_metrics": val})
        last.save(epoch, history, best_val)
        _logger.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  val_bal_acc %.4f  %.1f img/s%s",
                     epoch, t.epochs, stats["train_loss"], val["loss"], val["accuracy"], val["balanced_accuracy"],
                     stats["train_img_per_s"], "  *best*" if improved else "")
        if stop_all():
            raise stop.interrupted(run_dir, epoch, "at the end")
        if tracker.should_stop and epoch < t.epochs:
            _logger.info("Early stop: val %s has not improved for %d epoch(s) (best %.4f at epoch %d)",
                         t.monitor, tracker.bad_epochs, tracker.best, tracker.best_epoch)
            break
    return {"history": history, "best_epoch": tracker.best_epoch, "eval_loss": eval_loss, "best_val": best_val}


def prepare_run(cfg: DictConfig) -> tuple[dict | None, Path]:
    """Resume state and run dir. Under torchrun rank 0 alone resolves them (it alone touches files) and the
    other ranks receive them (and the resumed run's config); they also show no progress bars."""
    distributed.init_from_env()
    main = distributed.is_main()
    resumed = resume.prepare_resume(cfg) if main else None  # trainer.resume: adopts the run's config and dir
    validate.validate_config(cfg)  # before any heavy work
    run_dir = distributed.main_run_dir(lambda: resolve_run_dir(cfg))
    resumed = distributed.broadcast_object(resumed)
    if not main:
        if resumed is not None:
            resume.adopt_saved_config(cfg, resumed["config"], run_dir)
        cfg.trainer.progress = False
    return resumed, run_dir


def train(cfg: DictConfig) -> dict:
    """Run one training job described by `cfg`; writes the run dir and returns the metrics dict."""
    start = time.perf_counter()
    resumed, run_dir = prepare_run(cfg)
    main = distributed.is_main()
    threads = set_threads(distributed.threads_per_rank(cfg.trainer.threads))
    device = distributed.rank_device(select_device(cfg.trainer.device))
    accel = build_accel(device, amp=cfg.trainer.amp, channels_last=cfg.trainer.channels_last)
    generator = seed_everything(cfg.seed)
    if main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    splits, root = distributed.from_main(lambda: build_data(cfg))  # DDP: rank 0 lists/probes, the others receive
    splits, audit_report = distributed.from_main(lambda: audit.run_audit(
        splits, name=cfg.dataset.name, root=root, dedup=cfg.dataset.dedup, min_side=audit.input_side(cfg),
        out_dir=run_dir))
    b = cfg.backbone
    with distributed.main_first():  # rank 0 fills the weights cache, the others then read it
        model, weights_desc = backbone.build_backbone(name=b.name, num_classes=len(splits.classes),
                                                      weights=b.weights, drop_rate=b.drop_rate,
                                                      drop_path_rate=b.drop_path_rate, cache_dir=b.cache_dir)
    model = distributed.convert_sync_bn(model, cfg.trainer.sync_bn, device)  # before freezing (frozen BN: eval)
    imbalance = setup_imbalance(cfg, splits, model, run_dir)  # prior bias replaces the zero-init head bias
    data_cfg = backbone.data_config(model, b.input_size or cfg.dataset.input_size)
    if cfg.augment.grayscale_input:  # part of the preprocessing: the checkpoint's eval transform applies it too
        data_cfg["grayscale_input"] = True
    model.to(device)
    a = cfg.augment
    train_tf = augment.train_transform_from_cfg(data_cfg, a)
    seed_transform(train_tf, cfg.seed + distributed.rank())  # albumentations ignores the global seeds
    eval_tf = augment.build_eval_transform(data_cfg)
    with distributed.main_first():
        load = {"cache": build_image_cache(cfg, splits, data_cfg), "skip_log": run_dir / RUNTIME_SKIP_LOG if main
                else None}
    strategy_info = setup_strategy(cfg, model, splits.train, eval_tf, device, run_dir, resumed=resumed is not None)
    meta = checkpoint_meta(cfg, splits.classes, data_cfg, 0, {})
    weights = None if imbalance["class_weights"] == "none" else torch.tensor(list(imbalance["weights"].values()),
                                                                              dtype=torch.float32)
    if cached_fit.use_cached_path(cfg.features, strategy_info["mode"]):  # backbone once, head on cached features
        # no last.pt here: a re-run after a crash reuses the cached features and retrains the head in seconds
        result = cached_fit.fit_cached(model, splits, cfg, run_dir, meta, device, eval_tf=eval_tf, train_tf=train_tf,
                                       image_cache=load["cache"], class_weights=weights,
                                       init_bias=imbalance["prior_bias"].get("bias"))
        strategy_info["features"] = result["features"]
    else:
        loaders = {"train": make_loader(splits.train, train_tf, cfg, train=True, generator=generator, **load),
                   "val": make_loader(splits.val, eval_tf, cfg, train=False, **load)}
        with resume.GracefulStop() as stop:  # SIGINT/SIGTERM: finish the step, save last.pt, say how to resume
            result = fit(model, loaders, cfg, run_dir, meta, device, class_weights=weights, resume_state=resumed,
                         stop=stop, accel=accel)
    best_model, _ = distributed.load_checkpoint(run_dir, "best")  # DDP: read by rank 0, broadcast
    best_model.to(device)
    metrics = {"run_dir": str(run_dir), "monitor": cfg.trainer.monitor, "best_epoch": result["best_epoch"],
               "val": result["history"][result["best_epoch"] - 1 if result["best_epoch"] else -1]}
    metrics["val"] = {k.removeprefix("val_"): v for k, v in metrics["val"].items() if k.startswith("val_")}
    evals = {"val": result["best_val"]}
    if splits.test is not None and len(splits.test):
        test_loader = make_loader(splits.test, eval_tf, cfg, train=False, **load)
        metrics["test"], *test_out = engine.evaluate(best_model, test_loader, result["eval_loss"], device,
                                                     len(splits.classes), cfg.trainer.progress, "test", accel=accel)
        evals["test"] = tuple(test_out)
    runtime_skips = data.read_skip_log(load["skip_log"]) if main else []  # files that failed in a DataLoader worker
    splits.skipped += runtime_skips
    metrics.update(audit=audit_report["summary"], skipped_at_runtime=len(runtime_skips))
    metrics.update(history=result["history"], train_seconds=time.perf_counter() - start, device=str(device),
                   threads=threads, skipped_files=len(splits.skipped), imbalance=imbalance)
    if main:
        write_eval_reports(run_dir, metrics, evals, splits.classes, result["history"])
    metrics.update(status="ok", **{k: strategy_info[k] for k in _STRATEGY_KEYS if k in strategy_info})
    metrics["resumed_from_epoch"] = resumed["epoch"] if resumed else None
    model_info = {"backbone": b.name, "weights": weights_desc, "preprocessing": data_cfg, **strategy_info}
    if main:
        summary.write_run_files(run_dir, metrics, splits, cfg.dataset.name, str(Path(root).resolve()), model_info,
                                extra_sections=summary.strategy_sections(strategy_info), audit=audit_report)
        resume.finish(run_dir, cfg.trainer.keep_last)
    _logger.info("Done in %.0f s: best epoch %d, val %s", metrics["train_seconds"], metrics["best_epoch"],
                 {k: round(v, 4) for k, v in metrics["val"].items() if isinstance(v, float)})
    _logger.info("Run dir: %s", run_dir)
    return metrics




register_configs()


def record_failure(cfg: DictConfig, error: Exception, seconds: float) -> None:
    """Write `metrics.json` with status=failed and the error, so a sweep report lists the failed run."""
    try:
        run_dir = resolve_run_dir(cfg)
        failure = {"status": "failed", "error": f"{type(error).__name__}: {error}", "run_dir": str(run_dir),
                   "monitor": cfg.trainer.monitor, "train_seconds": seconds}
        (run_dir / "metrics.json").write_text(json.dumps(failure, indent=2))
    except Exception as e:  # never hide the original error behind a bookkeeping one
        _logger.warning("Could not record the failure in the run dir: %s", e)


def _sweep_kind() -> str | None:
    """None for a single run; "grid" under Hydra's basic sweeper; "search" under an optimising sweeper (optuna)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "grid" if str(HydraConfig.get().sweeper.get("_target_", "")).endswith(".BasicSweeper") else "search"


# An absolute config dir: the task function may be called as pipeline.train.main (see __main__ below).
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"),
            config_name="config")
def main(cfg: DictConfig) -> float:
    """Train; returns val `trainer.monitor` (the value sweepers optimise).

    A failed job writes metrics.json with status=failed. In a grid sweep it returns NaN so the other jobs and
    the sweep report still run; optimising sweepers (optuna) get the exception and mark the trial failed.
    """
    start = time.perf_counter()
    try:
        metrics = train(cfg)
    except resume.TrainingInterrupted as e:  # SIGINT/SIGTERM: last.pt saved, the message says how to resume
        print(e, file=sys.stderr)
        sys.exit(e.code)
    except Exception as e:
        if distributed.is_main():
            record_failure(cfg, e, time.perf_counter() - start)
        sweep = _sweep_kind()
        if sweep == "grid":  # the basic sweeper would stop the sweep (and skip its report) at the batch's end
            _logger.error("Run failed (recorded in its metrics.json); the sweep goes on: %s", e,
                          exc_info=not isinstance(e, PipelineError))
            return float("nan")
        if sweep is None:
            with exit_on_user_error():  # a user error: one line, exit code 2
                raise
        raise
    return metrics["val"][cfg.trainer.monitor]


if __name__ == "__main__":
    # Call the function of the imported module, not of __main__: parallel and cluster launchers (joblib,
    # submitit) pickle the task function, and only a module-level function pickles by reference.
    from pipeline.train import main as _main
    distributed.prepare_launch(sys.argv)  # torchrun: one run dir for all ranks, only rank 0 writes
    _main()
