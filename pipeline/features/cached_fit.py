"""The cached linear-probe run: features once per split (features/cache.py), a head trained on them
(features/heads.py), LogME per feature level, and a full-model `best` checkpoint that predicts the same.

Used by train.py whenever the resolved mode is `linear_probe` and `features.cached=true`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline.config.schema import AugmentConfig, FeaturesConfig, LossConfig, OptimConfig, TrainerConfig
from pipeline.data.device_decode import resolve_decode
from pipeline.features import heads
from pipeline.features.cache import Extraction, load_or_extract, model_key
from pipeline.model import checkpoint
from pipeline.model.multidepth import HEAD, check_levels_need_cache, level_dims, resolve_levels, uses_plain_head
from pipeline.runtime import distributed
from pipeline.runtime.files import write_json
from pipeline.training import interrupts, loss, tracking
from pipeline.training.fit import FitResult
from pipeline.transfer.logme import logme_score

_logger = logging.getLogger(__name__)


def use_cached_path(features_cfg, mode: str) -> bool:
    """The cached path runs for linear_probe with `features.cached`; depth options need it (error otherwise)."""
    cached = mode == "linear_probe" and features_cfg.cached
    check_levels_need_cache(features_cfg.depths, cached=cached, mode=mode)
    return cached


def level_columns(model: torch.nn.Module, levels: list) -> dict:
    """Column slice of each level inside features extracted for `levels` (concatenated in that order)."""
    cols, start = {}, 0
    for level in levels:
        width = level_dims(model, [level])
        cols[level] = slice(start, start + width)
        start += width
    return cols


def score_levels(model, train_x: np.ndarray, train_y: np.ndarray, levels: list) -> dict:
    """LogME of each level's train features: {level: {dim, logme}}."""
    return {str(level): {"dim": cols.stop - cols.start, "logme": logme_score(train_x[:, cols], train_y)}
            for level, cols in level_columns(model, levels).items()}


def extraction_workers(setting, trainer_workers: int, device: torch.device) -> int:
    """DataLoader workers for extraction: `auto` = trainer.num_workers on CUDA; 0 on CPU, where worker processes
    only add their start-up and feature_cache.threaded_batches decodes in threads (README "Performance")."""
    if setting == "auto":
        return trainer_workers if device.type == "cuda" else 0
    return setting


@dataclass(frozen=True)
class Views:
    """The augmented passes over train (features.augmented_views): `count` of them under `transform`, pass k seeded
    from `seed` + k; the `augment` group goes into their cache key."""
    count: int
    transform: object
    augment: AugmentConfig
    seed: int


@dataclass(frozen=True)
class FeatureSource:
    """Where a head's cached features come from: extracted as `how` says (the levels are set per fit), keyed by the
    backbone `arch` and the eval transform `eval_tf` of the plain passes (train, val); `views`: augmented passes over
    train (none for the probe)."""
    how: Extraction
    arch: str
    eval_tf: object
    views: Views | None = None


@dataclass(frozen=True)
class HeadFit:
    """How a head is fitted on cached features: `head` (auto | linear | logistic: heads.resolve_head), the linear
    head's `training`, the `loss` group, the run's `class_weights` and prior bias `init_bias`."""
    head: str
    training: heads.HeadTraining
    loss: LossConfig
    class_weights: torch.Tensor | None = None
    init_bias: list[float] | None = None


@dataclass(frozen=True)
class CachedRun:
    """The run dir the cached linear probe writes: `run_dir`, the `best` checkpoint's `meta`, `save_state()` writing
    its last.pt (resume.save_cached_state) and the `tracker` of the head's epochs (tracking.RunTracker, entered
    here)."""
    run_dir: Path
    meta: dict
    save_state: Callable[[], None]
    tracker: tracking.RunTracker


def extraction(features: FeaturesConfig, trainer: TrainerConfig, device: torch.device, *, image_cache=None,
               decode: str = "cpu", preprocessing: dict | None = None) -> Extraction:
    """The feature cache's settings (pre-logits) from the `features` and `trainer` groups; the plain passes decode
    and preprocess (data config `preprocessing`) on the device where `decode` (dataset.decode) resolves to gpu
    (data/device_decode.py)."""
    on_device = resolve_decode(decode, device) == "gpu"
    return Extraction(device=device, cache_dir=features.cache_dir or None, batch_size=trainer.eval_batch_size,
                      num_workers=extraction_workers(features.num_workers, trainer.num_workers, device),
                      channels_last=features.channels_last, image_cache=image_cache,
                      device_preprocessing=preprocessing if on_device else None)


def head_training(features: FeaturesConfig, trainer: TrainerConfig, optim: OptimConfig, *, seed: int,
                  sampler: str) -> heads.HeadTraining:
    """The linear head's training: its own budget (features.head_*), not the fine-tune's epochs; `sampler`:
    dataset.sampler."""
    return heads.HeadTraining(epochs=features.head_epochs, batch_size=trainer.batch_size, lr=optim.lr,
                              weight_decay=optim.weight_decay, monitor=trainer.monitor,
                              patience=features.head_patience, seed=seed, sampler=sampler)


def extract_all(model, splits, source: FeatureSource, levels: list) -> dict:
    """Cached features of `levels` of train, val (`source.eval_tf`) and the augmented `source.views` over train;
    the plain passes decode on the device where `source.how` says so (data/device_decode.py)."""
    how = replace(source.how, levels=levels)
    key_parts = model_key(source.arch, model, source.eval_tf)
    out = {"train": load_or_extract(model, splits.train, source.eval_tf, how, key_parts=key_parts, name="train"),
           "val": load_or_extract(model, splits.val, source.eval_tf, how, key_parts=key_parts, name="val"),
           "views": []}
    views = source.views
    if views is None:
        return out
    augment, how = OmegaConf.to_container(views.augment, resolve=True), replace(how, device_preprocessing=None)
    for view in range(1, views.count + 1):
        parts = {**key_parts, "augment": augment, "view": view, "seed": views.seed,
                 "workers": how.num_workers, "train_transform": str(views.transform)}
        out["views"].append(load_or_extract(model, splits.train, views.transform, how, key_parts=parts,
                                            name=f"train view {view}", seed=views.seed + view))
    return out


def train_head(data: heads.HeadData, fit: HeadFit, *, standardize: bool, on_epoch=None) -> dict:
    """Train the `fit.head` (auto resolved by heads.resolve_head; on standardised features if `standardize` or
    logistic, the scaler folded back in): the linear one as `fit.training` says; `on_epoch(history)` after each
    epoch (the logistic head has one).

    Returns weight/bias/history/best_epoch/best_val/eval_loss and `head` (the head that trained)."""
    x, y, val_x, val_y, num_classes = data.x, data.y, data.val_x, data.val_y, data.num_classes
    head = heads.resolve_head(fit.head, y, num_classes)
    standardize = standardize or head == "logistic"  # sklearn's C grid assumes unit-scale features
    mu, sigma = heads.standardizer(x) if standardize else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    xs, vs = (x - mu) / sigma, (val_x - mu) / sigma
    loss_fn, eval_loss = loss.build_losses(fit.loss, fit.class_weights)
    if head == "linear":
        out = heads.train_linear_head(replace(data, x=xs, val_x=vs), fit.training, loss_fn=loss_fn,
                                      eval_loss_fn=eval_loss, init_bias=fit.init_bias, on_epoch=on_epoch)
    else:
        start = time.perf_counter()
        weights = None if fit.class_weights is None else fit.class_weights.numpy()
        out = heads.fit_logistic_head(xs, y, num_classes=num_classes, class_weights=weights,
                                      monitor=fit.training.monitor, seed=fit.training.seed)
        linear = torch.nn.Linear(x.shape[1], num_classes)
        linear.load_state_dict({"weight": torch.as_tensor(out["weight"]).float(),
                                "bias": torch.as_tensor(out["bias"]).float()})
        train_m, _ = heads.evaluate_head(linear, torch.from_numpy(xs).float(), torch.from_numpy(y), eval_loss,
                                         num_classes)
        val, logits = heads.evaluate_head(linear, torch.from_numpy(vs).float(), torch.from_numpy(val_y), eval_loss,
                                          num_classes)
        seconds = time.perf_counter() - start
        out.update(best_epoch=1, best_val=(logits, val_y), history=[
            {"epoch": 1, "train_loss": train_m["loss"], "train_images": len(y), "train_seconds": seconds,
             "train_img_per_s": len(y) / max(seconds, 1e-9), **{f"val_{k}": v for k, v in val.items()}}])
        if on_epoch is not None:
            on_epoch(out["history"])
    out["weight"], out["bias"] = heads.fold_standardization(out["weight"], out["bias"], mu, sigma)
    out.update(eval_loss=eval_loss, head=head, standardized=standardize)
    return out


def fit_cached(model: torch.nn.Module, splits, source: FeatureSource, fit: HeadFit, run: CachedRun, *, depths,
               stop: interrupts.GracefulStop | None = None) -> FitResult:
    """Linear probe on cached features of `depths` (features.depths); writes `best` (full model) and features.json to
    `run.run_dir`. A FitResult with `features` (features.json's record) and `rows` (the val rows' split indices).

    Resumable: `last.pt` (`run.save_state`) is written first, and a SIGINT/SIGTERM during extraction or head
    training (`stop` entered by the caller) stops at once with the resume command; finished feature-cache entries
    are kept, so a resume extracts only what is missing and re-fits the (seeded) head."""
    run_dir, meta, stop = run.run_dir, run.meta, stop or interrupts.GracefulStop()  # not entered: never set
    levels, auto = resolve_levels(model, depths)
    run.save_state()
    with stop.at_once(run_dir, "during feature extraction (finished splits stay in the feature cache)"):
        feats = extract_all(model, splits, source, levels)
    train_x, train_y = feats["train"]["features"].numpy(), feats["train"]["labels"].numpy()
    scores = score_levels(model, train_x, train_y, levels)
    chosen = [max(levels, key=lambda v: scores[str(v)]["logme"])] if auto else levels
    if auto:
        _logger.info("features.depths=auto: LogME per level %s -> level %s",
                     {k: round(v["logme"], 4) for k, v in scores.items()}, chosen[0])
    cols = np.concatenate([np.arange(s.start, s.stop) for s in (level_columns(model, levels)[v] for v in chosen)])
    x = np.concatenate([train_x] + [v["features"].numpy() for v in feats["views"]])[:, cols]
    y = np.concatenate([train_y] + [v["labels"].numpy() for v in feats["views"]])
    val_x, val_y = feats["val"]["features"].numpy()[:, cols], feats["val"]["labels"].numpy()
    # The linear head on the backbone's own embedding sees the raw features, like the classifier of the
    # non-cached path, so optim.lr means the same in both (standardising measured 0.6 pt worse on flowers:
    # a ~6x larger effective step that overfits by epoch 3). Concatenated levels differ in scale and sklearn's
    # C grid assumes unit scale: those are standardised (train_head adds the logistic head).
    standardize = not uses_plain_head(chosen)
    with stop.at_once(run_dir, "during head training"), run.tracker as curves:
        head = train_head(heads.HeadData(x, y, val_x, val_y, meta["num_classes"]), fit, standardize=standardize,
                          on_epoch=curves.log)
    full = heads.install_head(model, chosen, head["weight"], head["bias"])
    best = head["history"][head["best_epoch"] - 1]
    ckpt_meta = {**meta, "epoch": head["best_epoch"], "val_metrics": {k[4:]: v for k, v in best.items()
                                                                      if k.startswith("val_")}}
    if not uses_plain_head(chosen):
        ckpt_meta["feature_levels"] = [str(v) if v == HEAD else int(v) for v in chosen]
    if distributed.is_main():  # DDP: every rank trained the same head on the gathered features
        checkpoint.save_checkpoint(run_dir, "best", full, ckpt_meta)
    info = {"cached": True, "head": head["head"], "levels": [str(v) for v in chosen], "auto": auto, "logme": scores,
            "train_images": int(len(y)), "augmented_views": source.views.count if source.views is not None else 0,
            "C": head.get("C"), "standardized": head["standardized"],
            "extraction": {k: {"hit": e["hit"], "seconds": round(e["seconds"], 2), "img_per_s": round(
                float(e["img_per_s"]), 1), "key": e["key"], "n": int(len(e["labels"]))}
                for k, e in [("train", feats["train"]), ("val", feats["val"])] +
                [(f"view{i + 1}", v) for i, v in enumerate(feats["views"])]}}
    if distributed.is_main():
        write_json(Path(run_dir) / "features.json", info)
    if stop():  # signalled while saving the head: stop now, as asked
        raise stop.interrupted(run_dir, "after head training")
    return FitResult(head["history"], head["best_epoch"], head["eval_loss"], head["best_val"], features=info,
                     rows={"val": feats["val"]["index"].numpy()})


def features_section(info: dict) -> list[str]:
    """summary.md paragraph: where the features came from, how fast, and LogME per level."""
    ex = info["extraction"]
    lines = ["## Cached features (linear probe)", "",
             f"Head `{info['head']}` trained on cached features of level(s) {', '.join(info['levels'])}"
             f"{' (chosen by LogME, features.depths=auto)' if info['auto'] else ''}; {info['train_images']} train "
             f"rows ({info['augmented_views']} augmented view(s)).", "",
             "| split | cache | images | seconds | img/s |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {'hit' if e['hit'] else 'miss'} | {e['n']} | {e['seconds']} | {e['img_per_s']} |"
              for k, e in ex.items()]
    lines += ["", "| level | dim | LogME |", "|---|---|---|"]
    lines += [f"| {k} | {v['dim']} | {v['logme']:.4f} |" for k, v in info["logme"].items()]
    return lines + [""]
