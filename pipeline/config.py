"""Structured config schemas (Hydra's "structured config schema" pattern).

`conf/config.yaml` lists `_config_schema` first in its defaults, so every YAML
option of every group is merged into these dataclasses: a typo'd key or a value
of the wrong type fails at start-up with Hydra's own message. Fields typed `Any`
accept several shapes (e.g. `freeze_depth: 3 | all`) and are checked by the stage
that uses them, with an error listing the allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = MISSING
    source: str = "folder"  # folder | digits (generated from sklearn into root)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = 0.2  # stratified split of train when no val/ exists
    url: Optional[str] = None  # archive to fetch when download=true (online users)
    download: bool = False
    download_hint: str = ""
    image_size: int = 64  # digits only: side of the written PNGs
    input_size: Optional[int] = None  # preferred model resolution for small images (backbone.input_size wins)
    min_per_class: int = 1
    max_pixels: int = 89_478_485  # decompression-bomb guard (PIL's default)
    audit_workers: int = 8


@dataclass
class BackboneConfig:
    name: str = "tf_efficientnet_lite0"
    weights: str = "auto"  # auto | embedded | hub | none | /path/to/file.{safetensors,pth}
    input_size: Optional[int] = None  # override pretrained_cfg resolution (e.g. small images)
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0
    cache_dir: str = "data/weights"


@dataclass
class StrategyConfig:
    mode: str = "finetune"  # linear_probe | partial | finetune
    freeze_depth: Any = 0  # int >= 0 or "all" (partial mode)
    bn: str = "frozen"  # frozen | affine | train


@dataclass
class AugmentConfig:
    preset: str = "light"  # none | light | medium | heavy
    hflip: bool = True
    scale_min: float = 0.5  # RandomResizedCrop lower scale bound (light preset)


@dataclass
class LossConfig:
    name: str = "ce"
    label_smoothing: float = 0.1


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # head learning rate
    backbone_lr_mult: float = 0.1  # backbone LR = lr * backbone_lr_mult * layer_decay^(groups from top)
    layer_decay: float = 1.0
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = all available cores
    monitor: str = "balanced_accuracy"  # val metric that picks the best checkpoint
    progress: bool = True
    max_train_batches: int = 0  # >0: cap batches per epoch (smoke runs)


@dataclass
class ExportConfig:
    """Defaults for `python -m pipeline.export` (pipeline/export.py); CLI flags override per export."""
    formats: list = field(default_factory=lambda: ["safetensors", "onnx", "torchscript"])
    opset: int = 17  # ONNX opset
    tolerance: float = 1e-3  # max abs logit diff of any format vs the PyTorch checkpoint
    parity_images: int = 16  # real val images used for the parity check


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
    seed: int = 42
    output_dir: Optional[str] = None  # run dir; default: Hydra's run dir
    data_dir: str = "data"  # generated datasets and caches


def register_configs() -> None:
    ConfigStore.instance().store(name="_config_schema", node=Config)
