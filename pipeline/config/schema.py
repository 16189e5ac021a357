"""The config schema: the type and the valid values of every key. The values themselves live in conf/ (YAML).

`conf/config.yaml` lists `_config_schema` first in its defaults, so every YAML option of every group is
merged into these dataclasses: a typo'd key or a value of the wrong type fails at start-up with Hydra's own
message. Each field carries its constraint (`choice`, `number`) as metadata, in the manner of scikit-learn's
`_parameter_constraints`; config/checks.py checks them all at start-up. No default is written here: a group's
values are in its YAML (`conf/<group>/*.yaml`), so each value is written once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

MISSING = "???"  # omegaconf.MISSING: the value must come from conf/
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# The valid values of the choice keys, one tuple each; the modules that act on them import them from here.
SOURCES = ("folder", "digits")
DEDUP_MODES = ("none", "drop_from_eval", "drop_near_from_eval")
CACHE_MODES = ("auto", "none", "memory", "disk")
DECODERS = ("auto", "cpu", "gpu")
SAMPLERS = ("shuffle", "balanced")
TASKS = ("auto", "single", "multilabel")  # dataset.task (data/manifest.py)
MODES = ("auto", "linear_probe", "partial", "finetune", "gradual")
BACKBONE_MODES = ("partial", "finetune", "gradual")  # resolved modes whose backbone groups train
BN_POLICIES = ("frozen", "affine", "train")
PRESETS = ("none", "light", "medium", "heavy", "strong", "custom")
AUTO_AUGMENT = ("none", "trivial", "randaugment")
HEAD_INITS = ("zero", "probe")
BOUNDARY_CACHE = ("auto", "always", "never")  # trainer.boundary_cache (training/boundary.py)
TTA_MODES = ("off", "auto", "flip")
OOD_MODES = ("knn", "off")  # trainer.ood (training/ood_fit.py)
LOSSES = ("ce", "focal")
WEIGHT_MODES = ("none", "balanced", "effective")
PRIOR_BIAS = ("auto", "true", "false")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
MONITORS = {"balanced_accuracy": "max", "accuracy": "max", "macro_f1": "max", "loss": "min"}  # + direction
AMP = ("auto", "off", "bf16", "fp16")
HEADS = ("auto", "linear", "logistic")
EXPORT_FORMATS = ("safetensors", "onnx", "torchscript")


def choice(options) -> Any:
    """A field whose value must be one of `options`."""
    return field(default=MISSING, metadata={"choices": tuple(options)})


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, example: Any = None, optional: bool = False) -> Any:
    """A numeric field within [low, high] (`*_open`: the bound itself is excluded); `optional`: null allowed."""
    return field(default=MISSING, metadata={"range": (low, high, low_open, high_open), "example": example,
                                            "optional": optional})


def value() -> Any:
    """A field with no constraint beyond its type."""
    return field(default=MISSING)


@dataclass
class DatasetConfig:
    name: str = value()
    root: str = value()
    source: str = choice(SOURCES)
    train_split: str = value()
    val_split: str = value()
    test_split: str = value()
    val_fraction: float = number(0, 1, low_open=True, high_open=True, example=0.2)
    test_fraction: float = number(0, 1, high_open=True, example=0.1)
    manifest: Optional[str] = value()  # a CSV path,label[,split]: checked by reading it (data/manifest.py)
    label_delim: str = value()
    task: str = choice(TASKS)
    url: Optional[str] = value()
    download: bool = value()
    download_hint: str = value()
    image_size: int = number(1, example=64)
    input_size: Optional[int] = number(1, example=128, optional=True)
    min_per_class: int = number(1, example=1)
    max_pixels: int = number(1, example=89_478_485)
    audit_workers: int = number(1, example=8)
    dedup: str = choice(DEDUP_MODES)
    cache: str = choice(CACHE_MODES)
    cache_ram_fraction: float = number(0, 1, low_open=True, example=0.25)
    decode: str = choice(DECODERS)
    cache_dir: str = value()
    sampler: str = choice(SAMPLERS)


@dataclass
class BackboneConfig:
    name: str = value()  # checked against timm's model list (training/validate.py)
    weights: str = value()  # auto | embedded | hub | none | a file: checked by reading it (training/validate.py)
    input_size: Optional[int] = number(1, example=224, optional=True)
    drop_rate: float = number(0, 1, high_open=True, example=0.2)
    drop_path_rate: float = number(0, 1, high_open=True, example=0.1)
    cache_dir: str = value()


@dataclass
class AutoStrategyConfig:
    large_per_class: int = number(1, example=300)
    large_total: int = number(1, example=1500)
    similar_gain: float = value()
    sample_per_class: int = number(1, example=40)
    sample_total: int = number(2, example=300)
    similar_freeze_depth: int = number(0, example=2)
    shallow_unfreeze: int = number(0, example=3)
    min_epochs: int = number(1, example=3)
    select_alpha: float = number(0, 1, low_open=True, high_open=True, example=0.05)
    ensemble: bool = value()


@dataclass
class StrategyConfig:
    mode: str = choice(MODES)
    freeze_depth: Any = value()  # int >= 0 or "all" (_check_freeze_depth; the upper bound needs the backbone)
    bn: str = choice(BN_POLICIES)
    warmup_epochs: int = number(0, example=1)
    unfreeze_every: int = number(1, example=1)
    unfreeze_groups: int = number(1, example=1)
    head_init: str = choice(HEAD_INITS)
    auto: AutoStrategyConfig = field(default_factory=AutoStrategyConfig)


@dataclass
class AugmentConfig:
    preset: str = choice(PRESETS)
    scale_min: float = number(0.001, 1, example=0.5)
    hflip: bool = value()
    vflip: bool = value()
    rot90: bool = value()
    color_jitter: float = number(0, 1, example=0.3)
    rotate: float = number(0.0, 180.0, example=10)
    translate: float = number(0.0, 0.5, example=0.05)
    shear: float = number(0.0, 45.0, example=5)
    coarse_dropout: float = number(0, 1, example=0.5)
    blur: float = number(0, 1, example=0.1)
    grayscale_input: bool = value()
    auto_augment: str = choice(AUTO_AUGMENT)
    random_erasing: float = number(0, 1, example=0.25)
    mixup: float = number(0.0, example=0.2)
    cutmix: float = number(0.0, example=1.0)
    mix_prob: float = number(0, 1, example=1.0)
    extra: list = value()  # albumentations ops, checked by building them (training/validate.py)


@dataclass
class LossConfig:
    name: str = choice(LOSSES)
    label_smoothing: float = number(0, 1, high_open=True, example=0.1)
    gamma: float = number(0.0, example=2.0)
    class_weights: Any = value()  # one of WEIGHT_MODES or {class_name: weight} (_check_class_weights)
    beta: float = number(0, 1, high_open=True, example=0.999)
    prior_bias: Any = choice(PRIOR_BIAS)  # YAML reads true/false as booleans: compared in lower case


@dataclass
class OptimConfig:
    name: str = choice(OPTIMIZERS)
    lr: float = number(0.0, low_open=True, example=1e-3)
    backbone_lr_mult: float = number(0.0, example=0.1)
    layer_decay: float = number(0, 1, low_open=True, example=1.0)
    weight_decay: float = number(0.0, example=0.01)
    momentum: float = number(0, 1, high_open=True, example=0.9)
    scheduler: str = choice(SCHEDULERS)
    warmup_epochs: float = number(0.0, example=1)
    fused: bool = value()


@dataclass
class TrainerConfig:
    epochs: Optional[int] = number(1, example=5, optional=True)  # null: the time limit plans the epochs
    time_limit: Optional[str] = value()  # null or a duration: 90s, 10m, 1.5h (checks.py parse_duration)
    batch_size: int = number(1, example=32)
    eval_batch_size: int = number(1, example=64)
    num_workers: int = number(0, example=2)
    device: str = choice(DEVICES)
    threads: int = number(0, example=0)
    sync_bn: bool = value()
    monitor: str = choice(MONITORS)
    early_stop_patience: int = number(0, example=3)
    progress: bool = value()
    max_train_batches: int = number(0, example=0)
    resume: Optional[str] = value()
    grad_clip: float = number(0.0, example=1.0)
    max_nonfinite_steps: int = number(1, example=5)
    amp: str = choice(AMP)
    channels_last: bool = value()
    compile: bool = value()
    keep_last: bool = value()
    tensorboard: bool = value()
    mlflow: bool = value()  # needs the mlflow package (checked at start-up: training/tracking.py check_mlflow)
    top_losses: int = number(0, example=16)
    ema: bool = value()
    boundary_cache: str = choice(BOUNDARY_CACHE)
    boundary_views: int = number(1, example=3)
    ema_decay: float = number(0, 1, low_open=True, high_open=True, example=0.999)
    tta: str = choice(TTA_MODES)
    calibrate: bool = value()
    ood: str = choice(OOD_MODES)
    ood_keep: float = number(0.5, 1, high_open=True, example=0.95)
    ood_fit_images: int = number(10, example=1000)


@dataclass
class FeaturesConfig:
    cached: bool = value()
    head: str = choice(HEADS)
    head_epochs: int = number(1, example=100)
    head_patience: int = number(0, example=10)
    depths: Any = value()  # "auto" or a list of feature levels and/or "head" (features/cached_fit.py resolve_levels)
    augmented_views: int = number(0, example=1)
    cache_dir: Optional[str] = value()
    channels_last: bool = value()
    num_workers: Any = value()  # "auto" or a count >= 0 (_check_auto_or_count)


@dataclass
class ExportConfig:
    formats: list = value()  # of EXPORT_FORMATS (_check_formats)
    opset: int = number(7, example=17)
    tolerance: float = number(0.0, example=1e-3)
    parity_images: int = number(1, example=16)
    int8: bool = value()
    int8_max_drop: float = number(0.0, example=0.5)
    int8_calibration_images: int = number(1, example=64)
    int8_check_images: int = number(1, example=256)


@dataclass
class AuditConfig:
    shortcut_threshold: float = number(0, 1, example=0.4)
    pair_separation: float = number(0, 1, low_open=True, example=0.6)
    pair_min_images: int = number(2, example=30)
    near_duplicate_distance: int = number(0, 256, example=20)
    folds: int = number(2, example=5)
    label_issues: bool = value()
    label_issues_top: int = number(1, example=20)
    invariance_images: int = number(0, example=500)
    rare_label_images: int = number(1, example=10)


@dataclass
class DistillConfig:
    teacher: Optional[str] = value()  # a finished run dir (make distill RUN=...); null: no distillation
    alpha: float = number(0, 1, example=0.5)
    temperature: float = number(0, low_open=True, example=2.0)


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    backbone: BackboneConfig = MISSING
    strategy: StrategyConfig = MISSING
    augment: AugmentConfig = MISSING
    loss: LossConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    export: ExportConfig = MISSING
    features: FeaturesConfig = MISSING
    audit: AuditConfig = MISSING
    distill: DistillConfig = MISSING
    seed: int = value()
    output_dir: Optional[str] = value()
    data_dir: str = value()
    backbones: list = value()


def unless_epochs(epochs: int | None, budget: str) -> str | None:
    """`trainer.time_limit`'s default (`${unless_epochs:${.epochs},2m}`): the budget while `trainer.epochs` is
    null, and no limit once an epoch count is given, so `trainer.epochs=N` alone trains N epochs as it always has."""
    return budget if epochs is None else None


def if_null(x: Any, fallback: Any) -> Any:
    """`${if_null:${trainer.epochs},5}`: `x`, or `fallback` where it is null."""
    return fallback if x is None else x


def register_configs() -> None:
    """The schema as `_config_schema` and the resolvers conf/ uses (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="_config_schema", node=Config)
    OmegaConf.register_new_resolver("unless_epochs", unless_epochs, replace=True)
    OmegaConf.register_new_resolver("if_null", if_null, replace=True)
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True, replace=True)  # cached: one id per command


def run_id() -> str:
    """A short id unique among runs started in the same second (conf/hydra/default.yaml's run and sweep dirs):
    the pid (unique among live processes on a host) and 2 random bytes (apart across hosts)."""
    import os
    import secrets
    return f"{os.getpid()}{secrets.token_hex(2)}"


GROUPS = {"dataset": DatasetConfig, "backbone": BackboneConfig, "strategy": StrategyConfig,
          "augment": AugmentConfig, "loss": LossConfig, "optim": OptimConfig, "trainer": TrainerConfig,
          "features": FeaturesConfig, "export": ExportConfig, "audit": AuditConfig,
          "distill": DistillConfig}
