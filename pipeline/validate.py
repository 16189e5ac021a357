"""Config validation before any heavy work (probing every image, building the model, training).

Each problem raises a one-line PipelineError naming the setting and the fix. What other stages
already check early is called from here, not repeated: trainer.monitor (metrics.check_monitor), the
strategy and LRs (strategy.validate_strategy_config), the backbone name with close-match suggestions
(backbone.check_arch), the weights file (backbone.read_state_dict / load_backbone_weights, here
against a meta-device model, so no memory or time is spent on the real one). The dataset root is
checked by sources.prepare_root; `check_dataset_layout` then counts image files per class (a listing,
no decoding) before data.load_imagefolder probes every file.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig

from pipeline import backbone, data
from pipeline.cached_fit import check_features_config
from pipeline.errors import ConfigError, MissingFileError, OutputError
from pipeline.metrics import check_monitor
from pipeline.strategy import validate_strategy_config

_logger = logging.getLogger(__name__)

# (key, smallest valid value, example): integers/floats that must be >= the bound
_LOWER_BOUNDS = (("trainer.epochs", 1, 5), ("trainer.batch_size", 1, 32), ("trainer.eval_batch_size", 1, 64),
                 ("trainer.num_workers", 0, 2), ("trainer.max_train_batches", 0, 0),
                 ("trainer.early_stop_patience", 0, 3), ("trainer.grad_clip", 0.0, 1.0),
                 ("trainer.max_nonfinite_steps", 1, 5), ("optim.weight_decay", 0.0, 0.01),
                 ("optim.warmup_epochs", 0.0, 1), ("dataset.min_per_class", 1, 1))


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_numbers(cfg: DictConfig) -> None:
    """Counts, sizes and rates that must be positive or non-negative, and the val fraction."""
    for key, low, example in _LOWER_BOUNDS:
        value = _get(cfg, key)
        if not value >= low:  # also catches NaN
            what = "positive" if low == 1 else f">= {low}"
            raise ConfigError(f"{key}={value} must be {what} (e.g. {key}={example})")
    fraction = cfg.dataset.val_fraction
    if not 0 < fraction < 1:
        raise ConfigError(f"dataset.val_fraction={fraction} must be in (0, 1) (e.g. 0.2), the share of train/ "
                          "split off as val when there is no val/ folder")


def check_weights_file(arch: str, weights: str) -> None:
    """A local weights file exists, is readable, parses as a state dict and fits `arch` (not its head)."""
    if weights in backbone.WEIGHT_SOURCES:
        return
    path = Path(weights).expanduser()
    if path.is_file() and not os.access(path, os.R_OK):
        raise MissingFileError(f"backbone.weights file {path} is not readable (permission denied): fix its "
                               "permissions or point backbone.weights at a readable copy")
    state = backbone.read_state_dict(path)  # missing / unparseable file: one-line errors with the fix
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    meta = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    backbone.load_backbone_weights(model, meta, f"backbone.weights={path}")


def validate_config(cfg: DictConfig) -> None:
    """Everything that can be checked from the config alone; raises ConfigError / MissingFileError."""
    check_monitor(cfg.trainer.monitor)
    s, o = cfg.strategy, cfg.optim
    validate_strategy_config(mode=s.mode, freeze_depth=s.freeze_depth, bn=s.bn, lr=o.lr,
                             backbone_lr_mult=o.backbone_lr_mult, layer_decay=o.layer_decay)
    check_numbers(cfg)
    check_features_config(cfg.features)
    backbone.check_arch(cfg.backbone.name)
    check_weights_file(cfg.backbone.name, cfg.backbone.weights)


def check_dataset_layout(root: Path, *, train_split: str, val_split: str, val_fraction: float,
                         min_per_class: int) -> None:
    """Before probing: every class has >= min_per_class image files, and a val split can be drawn from train."""
    train_dir = Path(root) / train_split
    classes = data.find_classes(train_dir)
    if len(classes) < 2:
        return  # data.load_imagefolder reports it with the expected layout
    paths, labels, _ = data.list_split(train_dir, classes)
    counts = Counter(labels)
    need = max(1, min_per_class)
    small = {c: counts.get(i, 0) for i, c in enumerate(classes) if counts.get(i, 0) < need}
    if small:
        raise ConfigError(f"Classes with fewer than {need} train image file(s) in {train_dir}: {small}; add images, "
                          f"remove those folders{' or lower dataset.min_per_class' if need > 1 else ''}")
    if (Path(root) / val_split).is_dir():
        return
    n_val = max(int(round(val_fraction * len(paths))), len(classes))
    if len(paths) - n_val < len(classes):
        raise ConfigError(f"No {val_split}/ folder in {root} and only {len(paths)} train images for {len(classes)} "
                          f"classes: a val split of {n_val} (dataset.val_fraction={val_fraction}, at least one per "
                          f"class) would leave classes without train images; add {root}/{val_split}/<class>/<image> "
                          "or more train images")


def ensure_writable_dir(path: Path) -> Path:
    """Create the run dir and prove it is writable, before any work whose results would be lost."""
    probe = Path(path) / ".write_test"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"Output dir {path} is not writable ({e.strerror or e}): set output_dir=... to a writable "
                          "dir, or fix its permissions / free disk space") from None
    return Path(path)
