"""Augment stage: albumentations pipelines built from the backbone's timm data config."""
from __future__ import annotations

import math

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from pipeline.errors import ConfigError

INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
                 "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}
PRESETS = ("none", "light")


def _size_and_interp(data_cfg: dict) -> tuple[int, int]:
    size = int(data_cfg["input_size"][-1])
    return size, INTERPOLATION.get(data_cfg.get("interpolation", "bilinear"), cv2.INTER_LINEAR)


def _normalize(data_cfg: dict) -> list:
    return [A.Normalize(mean=data_cfg["mean"], std=data_cfg["std"], max_pixel_value=255.0), ToTensorV2()]


def build_eval_transform(data_cfg: dict) -> A.Compose:
    """timm's eval transform: resize short side to size/crop_pct, center crop, normalize."""
    size, interp = _size_and_interp(data_cfg)
    scale = math.floor(size / data_cfg.get("crop_pct", 1.0))
    return A.Compose([A.SmallestMaxSize(max_size=scale, interpolation=interp),
                      A.CenterCrop(height=size, width=size), *_normalize(data_cfg)])


def build_train_transform(data_cfg: dict, *, preset: str = "light", hflip: bool = True,
                          scale_min: float = 0.5) -> A.Compose:
    """Training pipeline; `preset=none` is the eval transform (deterministic)."""
    if preset not in PRESETS:
        raise ConfigError(f"augment.preset='{preset}' is not valid; choose one of: {', '.join(PRESETS)}")
    if preset == "none":
        return build_eval_transform(data_cfg)
    if not 0.0 < scale_min <= 1.0:
        raise ConfigError(f"augment.scale_min={scale_min} must be in (0, 1]")
    size, interp = _size_and_interp(data_cfg)
    ops = [A.RandomResizedCrop(size=(size, size), scale=(scale_min, 1.0), interpolation=interp)]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    return A.Compose(ops + _normalize(data_cfg))
