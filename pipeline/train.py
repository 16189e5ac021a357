"""Entry point: `python -m pipeline.train [group=option] [key=value ...]` (or `make train`).

`train(cfg)` runs one job and returns its metrics (tests and sweeps call it); `main` is the Hydra task that
sweeps and launchers call. The stages it strings together live in the packages below (README "Layout").
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.budgeted import auto_budget
from pipeline.config import check_overrides, register_configs
from pipeline.data import augment, data_audit, folder
from pipeline.errors import PipelineError, exit_on_user_error
from pipeline.features import cached_fit, label_issues, probe_init
from pipeline.model import backbone, checkpoint
from pipeline.model.calibrated import wrap_for_inference
from pipeline.reports import gallery, plots, summary
from pipeline.reports.audit_report import write_audit_sheets
from pipeline.runtime import distributed, run_lock
from pipeline.runtime.devices import build_accel, select_device
from pipeline.runtime.files import write_json, write_text
from pipeline.runtime.process import set_threads, tune_allocator
from pipeline.runtime.seeding import seed_everything, seed_transform
from pipeline.training import boundary as boundary_module
from pipeline.training import budget, calibration, interrupts, loop, mixing, resume
from pipeline.training.fit import fit
from pipeline.training.loss import build_losses
from pipeline.training.metrics import val_test_gap
from pipeline.training.setup import (
    RUNTIME_SKIP_LOG,
    boundary_blocker,
    build_data,
    build_image_cache,
    checkpoint_meta,
    fork_workers_early,
    make_boundary_loaders,
    make_eval_loader,
    make_loader,
    prepare_run,
    resolve_run_dir,
    setup_imbalance,
    setup_strategy,
    timed_train_batch,
    write_split,
)

_logger = logging.getLogger(__name__)
_STRATEGY_KEYS = ("mode", "freeze_depth", "final_freeze_depth", "n_groups", "trainable_params", "total_params",
                  "decision", "features", "head_init")


def train(cfg: DictConfig) -> dict:
    """Run one training job described by `cfg`; writes the run dir and returns the metrics dict."""
    start, started = time.perf_counter(), budget.now()  # started: `trainer.time_limit` counts from here
    resumed, run_dir = prepare_run(cfg)  # rank 0 holds the run dir's lock (runtime/run_lock.py) until the end
    try:
        return run_job(cfg, run_dir, resumed, start=start, started=started)
    finally:
        run_lock.release(run_dir)


def run_job(cfg: DictConfig, run_dir: Path, resumed: dict | None, *, start: float, started: float) -> dict:
    """The stages of one run in its claimed `run_dir` (see `train`)."""
    main = distributed.is_main()
    threads = set_threads(distributed.threads_per_rank(cfg.trainer.threads))
    device = distributed.rank_device(select_device(cfg.trainer.device))
    accel = build_accel(device, amp=cfg.trainer.amp, channels_last=cfg.trainer.channels_last)
    generator = seed_everything(cfg.seed)
    if main:
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    splits, root = distributed.from_main(lambda: build_data(cfg))  # DDP: rank 0 lists/probes, the others receive
    splits, audit_report = distributed.from_main(lambda: data_audit.run_audit(
        splits, name=cfg.dataset.name, root=root, dedup=cfg.dataset.dedup, checks=cfg.audit, seed=cfg.seed,
        min_side=data_audit.input_side(cfg), out_dir=run_dir))
    if main:
        write_split(run_dir, splits)  # split.csv: given back as dataset.manifest, this run's split exactly
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
    if cfg.audit.label_issues:  # the pretrained features judge the labels, before training changes them
        audit_report["label_issues"] = label_issues.find_candidates(
            model, splits, cfg, device, eval_tf, weights_desc=weights_desc, image_cache=None)
    if main:
        write_json(run_dir / "audit.json", audit_report)  # now with the label issues, if looked for
        write_audit_sheets(run_dir, audit_report, cfg.dataset.max_pixels)  # beside audit.json
    strategy_info = setup_strategy(cfg, model, splits, eval_tf, device, run_dir, resumed=resumed is not None)
    cached_path = cached_fit.use_cached_path(cfg.features, strategy_info["mode"])  # backbone once, head on features
    with distributed.main_first():
        cache, cache_mode = build_image_cache(cfg, splits, data_cfg, repeated=not cached_path)
        load = {"cache": cache, "skip_log": run_dir / RUNTIME_SKIP_LOG if main else None}
    meta = checkpoint_meta(cfg, splits.classes, data_cfg, 0, {})
    weights = None if imbalance["class_weights"] == "none" else torch.tensor(list(imbalance["weights"].values()),
                                                                              dtype=torch.float32)
    fit_args = dict(model=model, splits=splits, run_dir=run_dir, meta=meta, device=device, accel=accel,
                    train_tf=train_tf, eval_tf=eval_tf, data_cfg=data_cfg, load=load, class_weights=weights,
                    init_bias=imbalance["prior_bias"].get("bias"), resumed=resumed, started=started)
    result = fit_strategy(cfg, strategy_info, cached_path, generator, fit_args)
    result["calibration"], result["best_val"] = calibration.calibrate_run(  # trainer.tta, trainer.calibrate
        cfg, run_dir, result["best_val"], lambda: make_eval_loader(splits.val, eval_tf, cfg, data_cfg, device, **load),
        device, accel)
    if "features" in result:
        strategy_info["features"] = result["features"]
    metrics, evals = evaluate_best(cfg, run_dir, result, splits, eval_tf, data_cfg, device, accel, load)
    runtime_skips = folder.read_skip_log(load["skip_log"]) if main else []  # files that failed in a DataLoader worker
    splits.skipped += runtime_skips
    metrics.update(audit=audit_report["summary"], skipped_at_runtime=len(runtime_skips), image_cache=cache_mode)
    metrics.update(history=result["history"], train_seconds=time.perf_counter() - start, device=str(device),
                   threads=threads, skipped_files=len(splits.skipped), imbalance=imbalance)
    if main:
        plots.write_eval_reports(run_dir, metrics, evals, splits.classes, result["history"])
        gallery.write_galleries(run_dir, evals, splits, splits.classes, n=cfg.trainer.top_losses,
                                skipped=runtime_skips, rows=result.get("rows"))  # top_losses_<split>.png/.csv
    metrics.update(status="ok", **{k: strategy_info[k] for k in _STRATEGY_KEYS if k in strategy_info})
    metrics["resumed_from_epoch"] = resumed["epoch"] if resumed else None
    model_info = {"backbone": b.name, "weights": weights_desc, "preprocessing": data_cfg, **strategy_info}
    if result.get("budget") is not None:  # trainer.time_limit: the plan, measured speeds, where the time went
        metrics["budget"] = result["budget"].report()
    if result.get("weight_averaging"):  # trainer.ema: which weights `best` holds, raw or the EMA
        metrics["weight_averaging"] = result["weight_averaging"]
    if main:
        summary.write_run_files(run_dir, metrics, splits, cfg.dataset.name, str(Path(root).resolve()), model_info,
                                extra_sections=summary.strategy_sections(strategy_info)
                                + summary.budget_sections(metrics.get("budget"))
                                + summary.calibration_sections(metrics.get("calibration"))
                                + summary.averaging_sections(metrics.get("weight_averaging"), result["history"]),
                                audit=audit_report)
        resume.finish(run_dir, cfg.trainer.keep_last)
    _logger.info("Done in %.0f s: best epoch %d, val %s", metrics["train_seconds"], metrics["best_epoch"],
                 {k: round(v, 4) for k, v in metrics["val"].items() if isinstance(v, float)})
    _logger.info("Run dir: %s", run_dir)
    return metrics


def fit_strategy(cfg: DictConfig, strategy_info: dict, cached_path: bool, generator, fit_args: dict) -> dict:
    """auto under `trainer.time_limit` (budgeted/auto_budget.py: probe, planned fine-tune, paired selection), else
    the resolved mode's fit, its head from a probe where `strategy.head_init=probe`."""
    a, mode = fit_args, strategy_info["mode"]
    if not cached_path and auto_budget.applies(strategy_mode=cfg.strategy.mode, time_limit=cfg.trainer.time_limit,
                                               mode=mode):
        result, update = auto_budget.run(budget_settings(cfg), strategy_info["decision"], auto_budget.Job(
            model=a["model"], splits=a["splits"], run_dir=a["run_dir"], meta=a["meta"], accel=a["accel"],
            resumed=a["resumed"] is not None, started=a["started"],
            fit_probe=lambda: probe_init.fit_probe(
                a["model"], a["splits"], cfg, device=a["device"], eval_tf=a["eval_tf"], data_cfg=a["data_cfg"],
                image_cache=a["load"]["cache"], class_weights=a["class_weights"], init_bias=a["init_bias"],
                head=cfg.features.head),
            fit_finetune=lambda boundary: run_fit(cfg, False, generator, boundary=boundary, **a),
            timed_batch=lambda: timed_train_batch(a["splits"], a["train_tf"], cfg, a["load"]["cache"]),
            eval_loss=build_losses(cfg.loss, a["class_weights"], a["device"])[1]))
        strategy_info.update(update)
        return result
    if not cached_path:
        probe = probe_init.init_head(a["model"], a["splits"], cfg, a["run_dir"], mode=mode, device=a["device"],
                                     eval_tf=a["eval_tf"], data_cfg=a["data_cfg"], image_cache=a["load"]["cache"],
                                     class_weights=a["class_weights"], init_bias=a["init_bias"],
                                     resumed=a["resumed"] is not None)
        if probe is not None:
            strategy_info["head_init"] = probe.info
    boundary = None
    if not cached_path and cfg.trainer.boundary_cache == "always":
        boundary = boundary_split_for(cfg, mode, a)
    return run_fit(cfg, cached_path, generator, boundary=boundary, **a)


def budget_settings(cfg: DictConfig) -> auto_budget.Settings:
    """What auto's time budget reads of the config (budgeted/auto_budget.py)."""
    a, t = cfg.strategy.auto, cfg.trainer
    return auto_budget.Settings(
        time_limit=t.time_limit, monitor=t.monitor, min_epochs=a.min_epochs, select_alpha=a.select_alpha,
        similar_freeze_depth=a.similar_freeze_depth, shallow_unfreeze=a.shallow_unfreeze, bn=cfg.strategy.bn,
        boundary_cache=t.boundary_cache if boundary_blocker(cfg, "partial") is None else "never",
        boundary_views=t.boundary_views, max_train_batches=t.max_train_batches, max_epochs=budget.max_epochs(t),
        seed=cfg.seed)


def boundary_split_for(cfg: DictConfig, mode: str, a: dict):
    """`trainer.boundary_cache=always`: the model's boundary split (training/boundary.py), or None with why."""
    blocker = boundary_blocker(cfg, mode)
    got = None if blocker else timed_train_batch(a["splits"], a["eval_tf"], cfg, a["load"]["cache"])
    split, why = (None, blocker or "no train image decoded") if got is None else \
        boundary_module.split_at_boundary(a["model"], a["accel"].images(got[0][0][:2]))
    _logger.info("trainer.boundary_cache=always: %s", why if split is not None else f"not used ({why})")
    return split


def run_fit(cfg: DictConfig, cached_path: bool, generator, *, model, splits, run_dir: Path, meta: dict, device,
            accel, train_tf, eval_tf, data_cfg: dict, load: dict, class_weights, init_bias, resumed, started,
            boundary=None) -> dict:
    """The cached linear probe (features/cached_fit.py) or the fine-tune fit (training/fit.py), under one SIGINT/SIGTERM
    handler: save last.pt (if not saved already) and say how to resume. `boundary`: a BoundarySplit
    (training/boundary.py): the fine-tune trains its top on cached activations at that boundary."""
    with interrupts.GracefulStop() as stop:
        if cached_path:
            mixing.log_cached_probe_ignores_mixing(cfg.augment)
            if cfg.trainer.time_limit is not None:
                _logger.info("trainer.time_limit=%s does not apply to the cached linear probe (features.cached): "
                             "it keeps its epoch count (features.head_epochs)", cfg.trainer.time_limit)
            if cfg.trainer.ema:
                _logger.info("trainer.ema does not apply to the cached linear probe (features.cached)")
            # its last.pt holds the config; a resume reuses the cached features and re-fits the head in seconds
            return cached_fit.fit_cached(model, splits, cfg, run_dir, meta, device, eval_tf=eval_tf, train_tf=train_tf,
                                         image_cache=load["cache"], class_weights=class_weights, init_bias=init_bias,
                                         stop=stop)
        if boundary is not None:
            loaders = make_boundary_loaders(boundary, splits, train_tf, eval_tf, cfg, accel=accel, **load)
        else:
            loaders = {"train": make_loader(splits.train, train_tf, cfg, train=True, generator=generator, **load),
                       "val": make_eval_loader(splits.val, eval_tf, cfg, data_cfg, device, **load)}
            fork_workers_early(loaders["val"])  # before the first train step grows the heap
        return fit(model, loaders, cfg, run_dir, meta, device, class_weights=class_weights, resume_state=resumed,
                   stop=stop, accel=accel, started=started, net=boundary.top if boundary is not None else None,
                   test_images=len(splits.test) if splits.test is not None else 0)


def evaluate_best(cfg: DictConfig, run_dir: Path, result: dict, splits, eval_tf, data_cfg: dict, device, accel,
                  load: dict) -> tuple[dict, dict]:
    """(metrics with the best epoch's val and the best checkpoint's test, {split: (logits, labels)})."""
    best_epoch = result["best_epoch"]
    metrics = {"run_dir": str(run_dir), "monitor": cfg.trainer.monitor, "best_epoch": best_epoch}
    if best_epoch == 0 and (run_dir / "best.json").is_file():  # auto's probe (epoch 0) stayed best
        metrics["val"] = checkpoint.read_checkpoint_meta(run_dir)["val_metrics"]
    else:
        chosen = "ema_val_" if (result.get("weight_averaging") or {}).get("chosen") == "ema" else "val_"  # ema
        row = result["history"][best_epoch - 1 if best_epoch else -1]
        metrics["val"] = {k.removeprefix(chosen): v for k, v in row.items() if k.startswith(chosen)}
    evals = {"val": result["best_val"]}
    if splits.test is not None and len(splits.test):
        best_model, best_meta = checkpoint.load_checkpoint(run_dir, "best")  # DDP: read by rank 0, broadcast
        best_model = wrap_for_inference(best_model, best_meta)  # TTA + temperature: the shipped model's numbers
        test_loader = make_eval_loader(splits.test, eval_tf, cfg, data_cfg, device, **load)
        metrics["test"], *test_out = loop.evaluate(best_model.to(device), test_loader, result["eval_loss"], device,
                                                   len(splits.classes), cfg.trainer.progress, "test", accel=accel)
        evals["test"] = tuple(test_out)
        metrics["val_test_gap"] = val_test_gap(*evals["val"], *evals["test"])
        if (metrics["val_test_gap"] or {}).get("shifted"):
            _logger.warning(summary.gap_line(metrics["val_test_gap"]))
    if result.get("calibration"):
        metrics["calibration"] = calibration.add_test_record(result["calibration"], *evals["test"]) \
            if "test" in evals else result["calibration"]
    return metrics, evals


def record_failure(cfg: DictConfig, error: Exception, seconds: float) -> None:
    """Write `metrics.json` with status=failed and the error, so a sweep report lists the failed run."""
    try:
        run_dir = resolve_run_dir(cfg)
        if not run_lock.may_record_failure(run_dir):  # a finished run, a live one, or one this command was refused
            _logger.debug("Failure not recorded in %s: it holds a run this command did not own", run_dir)
            return
        failure = {"status": "failed", "error": f"{type(error).__name__}: {error}", "run_dir": str(run_dir),
                   "monitor": cfg.trainer.monitor, "train_seconds": seconds}
        write_json(run_dir / "metrics.json", failure)
    except Exception as e:  # never hide the original error behind a bookkeeping one
        _logger.warning("Could not record the failure in the run dir: %s", e)


def _sweep_kind() -> str | None:
    """None for a single run; "grid" under Hydra's basic sweeper; "search" under an optimising sweeper (optuna)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "grid" if str(HydraConfig.get().sweeper.get("_target_", "")).endswith(".BasicSweeper") else "search"


register_configs()


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
    except interrupts.TrainingInterrupted as e:  # SIGINT/SIGTERM: last.pt saved, the message says how to resume
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
    tune_allocator()  # before torch allocates anything big
    with exit_on_user_error():
        check_overrides(sys.argv[1:])
    distributed.prepare_launch(sys.argv)  # torchrun: one run dir for all ranks, only rank 0 writes
    _main()
