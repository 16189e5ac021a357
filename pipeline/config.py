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
    dedup: str = "none"  # none (warn only) | drop_from_eval: drop val/test files identical to a train (or val) file
    cache: str = "none"  # none | memory | disk: decoded images resized to what the transform needs
    cache_dir: str = "${data_dir}/cache"  # dataset.cache=disk
    sampler: str = "shuffle"  # shuffle | balanced (each class drawn equally per epoch, seeded)


@dataclass
class BackboneConfig:
    name: str = "tf_efficientnet_lite0"
    weights: str = "auto"  # auto | embedded | hub | none | /path/to/file.{safetensors,pth}
    input_size: Optional[int] = None  # override pretrained_cfg resolution (e.g. small images)
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0
    cache_dir: str = "data/weights"


@dataclass
class AutoStrategyConfig:
    """Thresholds of the auto decision (see pipeline/auto_strategy.py)."""
    large_per_class: int = 300  # "large" needs at least this many train images in every class ...
    large_total: int = 1500  # ... and at least this many in all
    similar_gain: float = 0.3  # frozen-feature separability minus raw-pixel separability; >= -> "similar"
    sample_per_class: int = 40  # bounded sample for the separability probe
    sample_total: int = 300
    similar_freeze_depth: int = 2  # large+similar: keep the stem and first stage frozen (generic features)
    shallow_unfreeze: int = 3  # small+different: train only the top N layer groups


@dataclass
class StrategyConfig:
    mode: str = "auto"  # auto | linear_probe | partial | finetune | gradual
    freeze_depth: Any = 0  # partial: int >= 0 or "all"; gradual: the depth to thaw down to
    bn: str = "frozen"  # frozen | affine | train (for BatchNorm layers in frozen groups)
    warmup_epochs: int = 1  # gradual: head-only epochs before the first thaw
    unfreeze_every: int = 1  # gradual: epochs between thaws
    unfreeze_groups: int = 1  # gradual: layer groups thawed per step, from the top
    auto: AutoStrategyConfig = field(default_factory=AutoStrategyConfig)


@dataclass
class AugmentConfig:
    preset: str = "light"  # none | light | medium | heavy | custom (knob values: conf/augment/<preset>.yaml)
    scale_min: float = 0.5  # RandomResizedCrop lower scale bound
    hflip: bool = True
    vflip: bool = False  # domain knob: satellite, microscopy
    rot90: bool = False  # domain knob: random 90-degree rotations (no canonical orientation)
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (p=0.8); 0 = off
    rotate: float = 0.0  # Affine (p=0.5): max rotation in degrees
    translate: float = 0.0  # Affine: max shift as a fraction of the side
    shear: float = 0.0  # Affine: max shear in degrees
    coarse_dropout: float = 0.0  # probability of 1-4 mean-coloured holes (5-20% of the side)
    blur: float = 0.0  # probability of a Gaussian blur
    grayscale_input: bool = False  # domain knob (X-ray): one grey channel replicated to RGB, train and eval
    extra: list = field(default_factory=list)  # more albumentations ops: [{name: CLAHE, p: 0.3, clip_limit: 2}]


@dataclass
class LossConfig:
    name: str = "ce"  # ce | focal
    label_smoothing: float = 0.1
    gamma: float = 2.0  # focal only
    class_weights: Any = "none"  # none | balanced | effective | {class_name: weight}
    beta: float = 0.999  # effective-number weights (Cui et al. 2019)
    prior_bias: Any = "auto"  # auto | true | false: head bias = log class prior (auto: on if imbalance > 3)


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
    fused: bool = False  # torch's fused optimizer kernels (0.99x-1.22x in `make bench` runs: not a clear win)


@dataclass
class TrainerConfig:
    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = all available cores (torchrun: split between local ranks)
    sync_bn: bool = False  # torchrun on GPUs: SyncBatchNorm for BN layers that train (README "Multi-process")
    monitor: str = "balanced_accuracy"  # val metric for best checkpoint / early stop: + accuracy, macro_f1, loss
    early_stop_patience: int = 0  # stop after this many epochs without a better monitor value; 0 = off
    progress: bool = True
    max_train_batches: int = 0  # >0: cap batches per epoch (smoke runs)
    resume: Optional[str] = None  # null | auto | <run dir>: continue a killed/interrupted run (pipeline/resume.py)
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0 = off
    max_nonfinite_steps: int = 5  # stop after this many consecutive NaN/inf losses or gradients (pipeline/guard.py)
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16 (CUDA only)
    channels_last: bool = True  # NHWC model and batches: 1.8x faster training steps on CPU in `make bench`
    compile: bool = False  # torch.compile the model (inductor cache under data/cache/inductor)
    keep_last: bool = False  # keep last.pt (full training state, ~3x the model) after the run finishes


@dataclass
class FeaturesConfig:
    """Feature-extractor fast path (pipeline/cached_fit.py), used whenever the mode resolves to linear_probe."""
    cached: bool = True  # extract features once per split and train the head on them; false = backbone every epoch
    head: str = "linear"  # linear (torch, epochs/early stop/class weights) | logistic (sklearn, C by CV)
    depths: Any = field(default_factory=lambda: ["head"])  # feature levels (ints) and/or head; auto = best LogME
    augmented_views: int = 0  # extra augmented passes over train, cached like the plain one
    cache_dir: Optional[str] = "${data_dir}/cache/features"  # null = no disk cache (extract every run)
    channels_last: bool = True  # NHWC during extraction (yaml: follows trainer.channels_last)
    num_workers: Any = "auto"  # extraction workers; auto: trainer.num_workers on CUDA, 0 (decode threads) on CPU


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
    features: FeaturesConfig = MISSING
    seed: int = 42
    output_dir: Optional[str] = None  # run dir; default: Hydra's run dir
    data_dir: str = "data"  # generated datasets and caches
    backbones: list = field(default_factory=list)  # make rank: timm names to compare (empty: backbone.name)


def register_configs() -> None:
    ConfigStore.instance().store(name="_config_schema", node=Config)
