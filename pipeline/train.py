"""Entry point: `python -m pipeline.train [group=option] [key=value ...]` (or `make train`).

`train(cfg)` runs one job and returns its metrics (tests and sweeps call it); `main` is the Hydra task that
sweeps and launchers call. The stages it strings together live in the packages below (README "Layout").
"""
from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.budgeted import auto_budget
from pipeline.config import check_overrides, register_configs
from pipeline.config.compose import sweep_kind
from pipeline.data import augment, data_audit, folder, leaks
from pipeline.data.build import build_data, write_split
from pipeline.data.loaders import (
    RUNTIME_SKIP_LOG,
    LoaderSettings,
    TrainingData,
    build_image_cache,
    fork_workers_early,
    timed_train_batch,
)
from pipeline.errors import ConfigError, PipelineError, exit_on_user_error
from pipeline.features import cached_fit, label_issues, probe_init, teacher
from pipeline.model import backbone, ood
from pipeline.reports import gallery, plots, summary
from pipeline.reports.audit_report import write_audit
from pipeline.run_settings import (
    FitInputs,
    boundary_blocker,
    budget_settings,
    checkpoint_meta,
    feature_source,
    fit_settings,
    head_fit,
    invariance_check,
    ood_settings,
)
from pipeline.runtime import distributed, run_lock
from pipeline.runtime.devices import build_accel, select_device
from pipeline.runtime.files import write_json, write_text
from pipeline.runtime.process import set_threads, tune_allocator
from pipeline.runtime.seeding import seed_everything, seed_transform
from pipeline.training import boundary as boundary_module
from pipeline.training import (
    budget,
    calibration,
    interrupts,
    invariance,
    mixing,
    ood_fit,
    resume,
    tracking,
)
from pipeline.training.final_eval import evaluate_best, images_after_loop, shipped_model
from pipeline.training.fit import FitResult, FitRun, fit
from pipeline.training.loss import build_losses, setup_imbalance, weight_tensor
from pipeline.training.run_setup import prepare_run, resolve_run_dir
from pipeline.training.strategy import StrategyDecision, setup_strategy

_logger = logging.getLogger(__name__)
_STRATEGY_KEYS = ("mode", "freeze_depth", "final_freeze_depth", "n_groups", "trainable_params", "total_params",
                  "decision", "features", "head_init")


def train(cfg: DictConfig) -> dict:
    """Run one training job described by `cfg`; writes the run dir and returns the metrics dict."""
    start, started = time.perf_counter(), budget.now()  # started: `trainer.time_limit` counts from here
    if cfg.distill.teacher and not cfg.trainer.resume:
        teacher.adopt_teacher(cfg)  # make distill: the teacher run's dataset and split
    resumed, run_dir = prepare_run(cfg)  # rank 0 holds the run dir's lock (runtime/run_lock.py) until the end
    try:
        return run_job(cfg, run_dir, resumed, start=start, started=started)
    finally:
        run_lock.release(run_dir)
        gc.collect()  # loaders a failed run left in reference cycles stop their workers (TrainingData.close)


def run_job(cfg: DictConfig, run_dir: Path, resumed: dict | None, *, start: float, started: float) -> dict:
    """The stages of one run in its claimed `run_dir` (see `train`)."""
    main = distributed.is_main()
    threads = set_threads(distributed.threads_per_rank(cfg.trainer.threads))
    device = distributed.rank_device(select_device(cfg.trainer.device))
    accel = build_accel(device, amp=cfg.trainer.amp, channels_last=cfg.trainer.channels_last)
    generator = seed_everything(cfg.seed)
    if main:
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    splits, root, audit_report = audited_data(cfg, run_dir)
    if splits.multilabel:
        refuse_multilabel(splits, run_dir, audit_report, cfg.dataset.max_pixels)
    model, weights_desc, imbalance, data = build_model_and_data(cfg, splits, run_dir, device)
    if cfg.audit.label_issues:  # the pretrained features judge the labels, before training changes them
        audit_report["label_issues"] = label_issues.find_candidates(
            model, splits, cached_fit.FeatureSource(cached_fit.extraction(cfg.features, cfg.trainer, device),
                                                    cfg.backbone.name, data.eval_tf),
            audit=cfg.audit, seed=cfg.seed, weights_desc=weights_desc)
    if main:
        write_audit(run_dir, audit_report, cfg.dataset.max_pixels)  # now with the label issues, if looked for
    strategy = setup_strategy(model, data, device, run_dir, strategy=cfg.strategy,
                              time_limited=cfg.trainer.time_limit is not None, resumed=resumed is not None)
    cached_path = cached_fit.use_cached_path(cfg.features, strategy.mode)  # backbone once, head on features
    with distributed.main_first():
        data.cache, cache_mode = build_image_cache(cfg.dataset, splits, data.data_cfg, repeated=not cached_path)
        data.skip_log = run_dir / RUNTIME_SKIP_LOG if main else None
    taught = teach(cfg, data, device)  # make distill: the teacher's logits per train image; else None
    inputs = FitInputs(model, data, run_dir, checkpoint_meta(cfg, splits.classes, data.data_cfg), device, accel,
                       weight_tensor(imbalance), imbalance["prior_bias"].get("bias"), resumed=resumed, started=started,
                       final_images=images_after_loop(splits, invariance_check(cfg), ood_settings(cfg)))
    result = fit_strategy(cfg, strategy, cached_path, generator, inputs)
    data.end_training()  # what follows reads in this process: forked workers would cost more than they save
    result.calibration, result.best_val = calibration.calibrate_run(  # trainer.tta, trainer.calibrate
        cfg.trainer, run_dir, result.best_val, lambda: data.eval_loader(splits.val, device), device, accel)
    if result.features is not None:
        strategy.features = result.features
    metrics, evals = evaluate_best(result, run_dir, data, accel, monitor=cfg.trainer.monitor,
                                   progress=cfg.trainer.progress)
    shipped = shipped_model(run_dir, device, local=True) if main else None  # rank 0's checks of the shipped model
    if main and cfg.audit.invariance_images:  # does the model read how files are stored? (val)
        metrics["storage_invariance"] = invariance.check_storage_invariance(
            shipped, splits.val, splits.files, data.eval_tf, data.settings, accel, invariance_check(cfg))
    if main:  # the "unknown" answer (trainer.ood): fitted on train and val features, saved into best
        metrics[ood.KEY] = ood_fit.fit_and_save(run_dir, shipped, data, accel, ood_settings(cfg))
    if (metrics.get("val_test_gap") or {}).get("shifted"):
        _logger.warning(summary.gap_line(metrics["val_test_gap"]))
    runtime_skips = folder.read_skip_log(data.skip_log) if main else []  # files that failed in a DataLoader worker
    splits.skipped += runtime_skips
    facts = strategy.record()
    metrics.update(audit=audit_report["summary"], leaks=audit_report["leak_free"], image_cache=cache_mode,
                   skipped_at_runtime=len(runtime_skips),
                   history=result.history, train_seconds=time.perf_counter() - start, device=str(device),
                   threads=threads, skipped_files=len(splits.skipped), imbalance=imbalance, status="ok",
                   **{k: facts[k] for k in _STRATEGY_KEYS if k in facts})
    metrics["resumed_from_epoch"] = resumed["epoch"] if resumed else None
    if result.budget is not None:  # trainer.time_limit: the plan, measured speeds, where the time went
        metrics["budget"] = result.budget.report()
    if result.weight_averaging:  # trainer.ema: which weights `best` holds, raw or the EMA
        metrics["weight_averaging"] = result.weight_averaging
    if taught is not None:  # make distill: the teacher, its settings and its logits' pass
        metrics["distill"] = taught
    if main:
        model_info = {"backbone": cfg.backbone.name, "weights": weights_desc, "preprocessing": data.data_cfg,
                      **facts}
        write_eval_files(cfg, run_dir, metrics, evals, result, splits, runtime_skips)
        summary.write_run_files(run_dir, metrics, splits, dataset_name=cfg.dataset.name,
                                root=str(Path(root).resolve()), model_info=model_info, audit=audit_report)
        resume.finish(run_dir, cfg.trainer.keep_last)
    _logger.info("Done in %.0f s: best epoch %d, val %s", metrics["train_seconds"], metrics["best_epoch"],
                 {k: round(v, 4) for k, v in metrics["val"].items() if isinstance(v, float)})
    _logger.info("Run dir: %s", run_dir)
    return metrics


def teach(cfg: DictConfig, data: TrainingData, device: torch.device) -> dict | None:
    """`distill.teacher` set (make distill): the teacher's logits of every train image, computed once through the
    feature cache (features/teacher.py), put on `data` as its train targets; returns their record, else None."""
    if not cfg.distill.teacher:
        return None
    data.train_targets, record = teacher.teacher_targets(cfg.distill, data.splits.train,
                                                         cached_fit.extraction(cfg.features, cfg.trainer, device))
    return record


def audited_data(cfg: DictConfig, run_dir: Path) -> tuple[folder.DatasetSplits, Path, dict]:
    """The dataset listed, checked and split (DDP: rank 0 lists and checks, the others receive), then audited
    (data/data_audit.py, `dataset.dedup` applied); rank 0 writes split.csv; leaked val/test files are set aside
    (data/leaks.py). Returns (splits, root, audit report)."""
    dataset, net = cfg.dataset, cfg.backbone
    splits, root = distributed.from_main(lambda: build_data(dataset, seed=cfg.seed))
    splits, audit_report = distributed.from_main(lambda: data_audit.run_audit(
        splits, name=dataset.name, root=root, dedup=dataset.dedup, checks=cfg.audit, seed=cfg.seed,
        min_side=backbone.input_side(net.name, net.input_size or dataset.input_size)))
    if distributed.is_main():
        write_split(run_dir, splits)  # split.csv: given back as dataset.manifest, this run's split exactly
    splits, audit_report["leak_free"] = leaks.set_aside(splits, audit_report)  # copies of train files: scored apart
    return splits, root, audit_report


def refuse_multilabel(splits: folder.DatasetSplits, run_dir: Path, audit_report: dict, max_pixels: int) -> None:
    """Multi-label data (data/manifest.py) is audited, not trained on (issue 34): the audit written, then one line."""
    if distributed.is_main():
        write_audit(run_dir, audit_report, max_pixels)
    raise ConfigError(f"{splits.layout} holds multi-label data ({len(splits.classes)} labels): training on it is not "
                      "built yet; `make audit` audits it (labels per split, co-occurrence, duplicates); give each "
                      "row one label to train a classifier (dataset.label_delim='' reads a cell as one class name)")


def build_model_and_data(cfg: DictConfig, splits: folder.DatasetSplits, run_dir: Path, device: torch.device):
    """The backbone with its new head (on `device`), its weights' description, the imbalance plan (whose prior
    bias replaces the zero-init head bias) and the run's TrainingData (transforms from the model's preprocessing;
    the image cache comes later, once the strategy says whether images are read every epoch)."""
    net = cfg.backbone
    with distributed.main_first():  # rank 0 fills the weights cache, the others then read it
        model, weights_desc = backbone.build_backbone(name=net.name, num_classes=len(splits.classes),
                                                      weights=net.weights, drop_rate=net.drop_rate,
                                                      drop_path_rate=net.drop_path_rate, cache_dir=net.cache_dir)
    model = distributed.convert_sync_bn(model, cfg.trainer.sync_bn, device)  # before freezing (frozen BN: eval)
    imbalance = setup_imbalance(cfg.loss, cfg.dataset.sampler, splits, model, run_dir)
    data_cfg = backbone.data_config(model, net.input_size or cfg.dataset.input_size)
    if cfg.augment.grayscale_input:  # part of the preprocessing: the checkpoint's eval transform applies it too
        data_cfg["grayscale_input"] = True
    model.to(device)
    train_tf = augment.build_train_transform(data_cfg, augment.TrainAugment.from_group(cfg.augment))
    seed_transform(train_tf, cfg.seed + distributed.rank())  # albumentations ignores the global seeds
    data = TrainingData(splits, train_tf, augment.build_eval_transform(data_cfg), data_cfg,
                        LoaderSettings.from_groups(cfg.trainer, cfg.dataset, cfg.seed))
    return model, weights_desc, imbalance, data


def fit_strategy(cfg: DictConfig, strategy: StrategyDecision, cached_path: bool, generator,
                 inputs: FitInputs) -> FitResult:
    """auto under `trainer.time_limit` (budgeted/auto_budget.py: probe, planned fine-tune, paired selection), else
    the resolved mode's fit, its head from a probe where `strategy.head_init=probe`."""
    mode, data = strategy.mode, inputs.data
    if not cached_path and auto_budget.applies(strategy_mode=cfg.strategy.mode, time_limit=cfg.trainer.time_limit,
                                               mode=mode):
        settings = budget_settings(cfg)
        inputs = replace(inputs, final_images=auto_budget.after_loop_images(inputs.final_images, settings))
        result, update = auto_budget.run(settings, strategy.decision, auto_budget.Job(
            model=inputs.model, splits=data.splits, run_dir=inputs.run_dir, meta=inputs.meta, accel=inputs.accel,
            resumed=inputs.resumed is not None, started=inputs.started,
            fit_probe=lambda: probe_init.fit_probe(inputs.model, data.splits, feature_source(cfg, inputs),
                                                   head_fit(cfg, inputs, cfg.features.head)),
            fit_finetune=lambda boundary: run_fit(cfg, False, generator, inputs, boundary=boundary),
            timed_batch=lambda: timed_train_batch(data.splits, data.train_tf, data.settings, data.cache),
            eval_loss=build_losses(cfg.loss, inputs.class_weights, inputs.device)[1], final_images=inputs.final_images))
        strategy.freezing.update(update)
        return result
    if not cached_path:
        probe = probe_init.init_head(
            lambda head: probe_init.fit_probe(inputs.model, data.splits, feature_source(cfg, inputs),
                                              head_fit(cfg, inputs, head)),
            head_init=cfg.strategy.head_init, head=cfg.features.head, mode=mode, run_dir=inputs.run_dir,
            resumed=inputs.resumed is not None)
        if probe is not None:
            strategy.head_init = probe.info
    boundary = None
    if not cached_path and cfg.trainer.boundary_cache == "always":
        boundary = boundary_module.split_for_fine_tune(inputs.model, inputs.data, inputs.accel,
                                                       blocker=boundary_blocker(cfg, mode))
    return run_fit(cfg, cached_path, generator, inputs, boundary=boundary)


def run_fit(cfg: DictConfig, cached_path: bool, generator, inputs: FitInputs, *, boundary=None) -> FitResult:
    """The cached linear probe (features/cached_fit.py) or the fine-tune fit (training/fit.py), under one SIGINT/SIGTERM
    handler: save last.pt (if not saved already) and say how to resume. `boundary`: a BoundarySplit
    (training/boundary.py): the fine-tune trains its top on cached activations at that boundary."""
    data = inputs.data
    splits = data.splits
    with interrupts.GracefulStop() as stop:
        if cached_path:
            mixing.log_cached_probe_ignores_mixing(cfg.augment)
            if cfg.trainer.time_limit is not None:
                _logger.info("trainer.time_limit=%s does not apply to the cached linear probe (features.cached): "
                             "it keeps its epoch count (features.head_epochs)", cfg.trainer.time_limit)
            if cfg.trainer.ema:
                _logger.info("trainer.ema does not apply to the cached linear probe (features.cached)")
            # its last.pt holds the config; a resume reuses the cached features and re-fits the head in seconds
            views = cached_fit.Views(cfg.features.augmented_views, data.train_tf, cfg.augment, cfg.seed)
            run_config = inputs.meta["config"]
            written = cached_fit.CachedRun(inputs.run_dir, inputs.meta,
                                           lambda: resume.save_cached_state(inputs.run_dir, run_config),
                                           tracking.RunTracker(inputs.run_dir, cfg.trainer, run_config))
            return cached_fit.fit_cached(inputs.model, splits, feature_source(cfg, inputs, views),
                                         head_fit(cfg, inputs, cfg.features.head), written,
                                         depths=cfg.features.depths, stop=stop)
        if boundary is not None:
            loaders = boundary_module.make_boundary_loaders(boundary, data, views=cfg.trainer.boundary_views,
                                                            accel=inputs.accel)
        else:
            loaders = {"train": data.train_loader(generator), "val": data.eval_loader(splits.val, inputs.device)}
            fork_workers_early(loaders["val"])  # before the first train step grows the heap
        return fit(inputs.model, loaders,
                   fit_settings(cfg),
                   FitRun(inputs.run_dir, inputs.meta, resume_state=inputs.resumed, stop=stop, started=inputs.started,
                          test_images=inputs.final_images),
                   accel=inputs.accel, class_weights=inputs.class_weights,
                   net=boundary.top if boundary is not None else None)


def write_eval_files(cfg: DictConfig, run_dir: Path, metrics: dict, evals: dict, result: FitResult, splits,
                     runtime_skips: list) -> None:
    """Rank 0's eval plots (they add the per-class metrics to `metrics`) and top-loss galleries."""
    plots.write_eval_reports(run_dir, metrics, evals, splits.classes, result.history)
    gallery.write_galleries(run_dir, evals, splits, n=cfg.trainer.top_losses,
                            skipped=runtime_skips, rows=result.rows)  # top_losses_<split>.png/.csv


def record_failure(cfg: DictConfig, error: Exception, seconds: float) -> None:
    """Write `metrics.json` with status=failed and the error, so a sweep report lists the failed run."""
    try:
        run_dir = resolve_run_dir(cfg.output_dir)
        if not run_lock.may_record_failure(run_dir):  # a finished run, a live one, or one this command was refused
            _logger.debug("Failure not recorded in %s: it holds a run this command did not own", run_dir)
            return
        failure = {"status": "failed", "error": f"{type(error).__name__}: {error}", "run_dir": str(run_dir),
                   "monitor": cfg.trainer.monitor, "train_seconds": seconds}
        write_json(run_dir / "metrics.json", failure)
    except Exception as e:  # never hide the original error behind a bookkeeping one
        _logger.warning("Could not record the failure in the run dir: %s", e)


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
        sweep = sweep_kind()
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
