"""The train entry point's adapters: the config's groups turned into the typed settings each stage takes (one
adapter per stage, as timm's `optimizer_kwargs(cfg)`), and `FitInputs`, what a fit works on. With train.py, the
only place of the train command that reads the whole config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.budgeted import auto_budget
from pipeline.data.loaders import TrainingData
from pipeline.features import cached_fit
from pipeline.runtime.devices import Accel
from pipeline.training import boundary as boundary_module
from pipeline.training import budget, invariance, ood_fit
from pipeline.training.fit import FitSettings


@dataclass
class FitInputs:
    """What a fit works on: the model and the run's images, where it writes, and how it runs."""
    model: torch.nn.Module
    data: TrainingData
    run_dir: Path
    meta: dict  # the checkpoint meta (checkpoint_meta)
    device: torch.device
    accel: Accel
    class_weights: torch.Tensor | None
    init_bias: list | None  # the prior-bias init of the head (training/loss.py), or None
    resumed: dict | None  # the resume state (training/resume.py), or None
    started: float  # a budget.now() reading: `trainer.time_limit` counts from it
    final_images: int = 0  # eval images' worth of work after the loop (final_eval.images_after_loop)


def checkpoint_meta(cfg: DictConfig, classes: list[str], data_cfg: dict) -> dict:
    """The meta every checkpoint of the run carries (model/checkpoint.py); the fit sets epoch and val."""
    return {"arch": cfg.backbone.name, "num_classes": len(classes), "class_names": classes,
            "preprocessing": data_cfg, "epoch": 0, "val_metrics": {},
            "config": OmegaConf.to_container(cfg, resolve=True)}


def feature_source(cfg: DictConfig, inputs: FitInputs, views: cached_fit.Views | None = None):
    """Where a head's cached features come from (features/cached_fit.py): the run's backbone and images."""
    data = inputs.data
    return cached_fit.FeatureSource(
        cached_fit.extraction(cfg.features, cfg.trainer, inputs.device, image_cache=data.cache,
                              decode=cfg.dataset.decode, preprocessing=data.data_cfg),
        cfg.backbone.name, data.eval_tf, views)


def head_fit(cfg: DictConfig, inputs: FitInputs, head: str) -> cached_fit.HeadFit:
    """How a `head` is fitted on cached features: `features.head_*`, the loss and the run's class weights."""
    return cached_fit.HeadFit(head, cached_fit.head_training(cfg.features, cfg.trainer, cfg.optim, seed=cfg.seed,
                                                             sampler=cfg.dataset.sampler),
                              cfg.loss, inputs.class_weights, inputs.init_bias)


def boundary_blocker(cfg: DictConfig, mode: str) -> str | None:
    """Why a fine-tune in `mode` cannot train on cached boundary activations (training/boundary.py), or None."""
    return boundary_module.boundary_blocker(mode, trainer=cfg.trainer, augment=cfg.augment, bn=cfg.strategy.bn)


def budget_settings(cfg: DictConfig) -> auto_budget.Settings:
    """What auto's time budget reads of the config (budgeted/auto_budget.py)."""
    rules, trainer = cfg.strategy.auto, cfg.trainer
    return auto_budget.Settings(
        time_limit=trainer.time_limit, monitor=trainer.monitor, min_epochs=rules.min_epochs,
        select_alpha=rules.select_alpha, similar_freeze_depth=rules.similar_freeze_depth,
        shallow_unfreeze=rules.shallow_unfreeze, bn=cfg.strategy.bn,
        boundary_cache=trainer.boundary_cache if boundary_blocker(cfg, "partial") is None else "never",
        boundary_views=trainer.boundary_views, ship_ensemble=rules.ensemble,
        max_train_batches=trainer.max_train_batches,
        max_epochs=budget.max_epochs(trainer.epochs),
        seed=cfg.seed)


def fit_settings(cfg: DictConfig) -> FitSettings:
    """The fine-tune fit's groups (training/fit.py), and where torch.compile caches its kernels."""
    return FitSettings(cfg.trainer, cfg.optim, cfg.strategy, cfg.augment, cfg.loss,
                       compile_cache_dir=Path(cfg.data_dir) / "cache" / "inductor", distill=cfg.distill)


def invariance_check(cfg: DictConfig) -> invariance.InvarianceCheck:
    """The storage-invariance check's settings (training/invariance.py)."""
    return invariance.InvarianceCheck(cfg.audit.invariance_images, cfg.trainer.monitor, cfg.seed)


def ood_settings(cfg: DictConfig) -> ood_fit.OodSettings:
    """The "unknown" rule's settings (training/ood_fit.py): trainer.ood, ood_keep, ood_fit_images."""
    return ood_fit.OodSettings(cfg.trainer.ood, float(cfg.trainer.ood_keep), int(cfg.trainer.ood_fit_images), cfg.seed)
