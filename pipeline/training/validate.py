"""Config validation at start-up, before any data is read or any model is built.

`config.check_values` checks every key against its constraint in the schema (pipeline/config/schema.py: choices
and numeric ranges, one message format). `validate_config` adds what needs the backbone but not its weights,
checked on a meta-device model (no memory, no time): the name (with close matches), a weights file (read
and matched against the architecture), the freeze depth against the backbone's layer groups, the feature
levels, and the augmentation ops. Each problem is a one-line PipelineError naming the setting and the fix.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import check_values
from pipeline.data import augment
from pipeline.errors import ConfigError, MissingFileError
from pipeline.model import backbone, freezing, multidepth
from pipeline.training import distill, tracking

_logger = logging.getLogger(__name__)


def check_weights_file(model: torch.nn.Module, weights: str) -> None:
    """A local weights file exists, is readable, parses as a state dict and fits the (meta) model, not its head."""
    if weights in backbone.WEIGHT_SOURCES:
        return
    path = Path(weights).expanduser()
    if path.is_file() and not os.access(path, os.R_OK):
        raise MissingFileError(f"backbone.weights file {path} is not readable (permission denied): fix its "
                               "permissions or point backbone.weights at a readable copy")
    state = backbone.read_state_dict(path)  # missing / unparseable file: one-line errors with the fix
    meta = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    backbone.load_backbone_weights(model, meta, f"backbone.weights={path}")


def meta_model(arch: str) -> torch.nn.Module:
    """`arch` on the meta device: its layer groups, feature levels and tensor shapes, with no memory spent."""
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False)


def validate_config(cfg: DictConfig) -> None:
    """Everything that can be checked from the config and the backbone's definition (see the module doc)."""
    check_values(cfg)
    backbone.check_arch(cfg.backbone.name)
    model = meta_model(cfg.backbone.name)
    check_weights_file(model, cfg.backbone.weights)
    s = cfg.strategy
    if s.mode in ("partial", "gradual"):  # linear_probe, finetune and auto set their own depth
        freezing.resolve_freeze_depth("partial", s.freeze_depth, len(freezing.layer_groups(model)))
    multidepth.resolve_levels(model, cfg.features.depths)
    tracking.check_mlflow(cfg.trainer)  # trainer.mlflow=true without the package: one line, now
    if s.mode != "auto":  # auto decides the mode later; its linear_probe is the cached path
        multidepth.check_levels_need_cache(cfg.features.depths, cached=s.mode == "linear_probe" and cfg.features.cached,
                                           mode=s.mode)
    if cfg.dataset.decode == "gpu" and not torch.cuda.is_available():
        raise ConfigError("dataset.decode=gpu needs a CUDA device, and none is visible; use dataset.decode=auto or cpu")
    augment.build_extra(OmegaConf.to_container(cfg.augment.extra, resolve=True))  # building the ops checks them
    distill.check(cfg.distill, mode=s.mode, boundary_cache=cfg.trainer.boundary_cache,
                  mixing=cfg.augment.mixup > 0 or cfg.augment.cutmix > 0)
