"""Augment stage: albumentations pipelines built from the backbone's timm data config.

Eval reproduces timm's own eval transform pixel for pixel (PIL antialiased resize of the
short side to floor(size / crop_pct), torchvision's center-crop rounding). Training starts
with a RandomResizedCrop (INTER_AREA when shrinking, so train and eval images are equally
antialiased) and adds the knobs of the chosen preset (conf/augment/<preset>.yaml): geometry, then
torchvision's TrivialAugmentWide / RandAugment (`auto_augment`, as timm places it), colour, albumentations'
random erasing (`random_erasing`), normalisation. Mixup/CutMix mix whole batches: training/mixing.py.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Iterable

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torchvision.transforms import v2

from pipeline.data.images import PIL_RESAMPLE, resize_short_side
from pipeline.errors import ConfigError

_logger = logging.getLogger(__name__)

INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
                 "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}


class ResizeShortSide(A.ImageOnlyTransform):
    """Resize so the short side is `short_side` (torchvision's rule, PIL resampling as timm uses)."""

    def __init__(self, short_side: int, interpolation: str = "bicubic", squash: bool = False, p: float = 1.0):
        super().__init__(p=p)
        self.short_side, self.interpolation, self.squash = short_side, interpolation, squash

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        if self.squash:  # timm crop_mode="squash": both sides to short_side, aspect ratio not kept
            return np.asarray(Image.fromarray(img).resize((self.short_side,) * 2, PIL_RESAMPLE[self.interpolation]))
        return resize_short_side(img, self.short_side, self.interpolation)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("short_side", "interpolation", "squash")


class CenterCropExact(A.ImageOnlyTransform):
    """torchvision's CenterCrop: offsets int(round((dim - size) / 2)), zero padding if the image is smaller."""

    def __init__(self, size: int, p: float = 1.0):
        super().__init__(p=p)
        self.size = size

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        h, w = img.shape[:2]
        if h < self.size or w < self.size:
            ph, pw = max(self.size - h, 0), max(self.size - w, 0)
            img = np.pad(img, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
            h, w = img.shape[:2]
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        return np.ascontiguousarray(img[top:top + self.size, left:left + self.size])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


AUTO_AUGMENT_OPS = {"trivial": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}  # augment.auto_augment


class AutoAugment(A.ImageOnlyTransform):
    """torchvision's TrivialAugmentWide or RandAugment (v2, default magnitudes) on the HWC uint8 image.

    The torchvision op draws from torch's global RNG; it runs here under a seed drawn from the pipeline's own
    numpy RNG, with torch's CPU RNG state restored afterwards: `seeding.seed_transform` (and `seed_worker` in
    DataLoader workers) make its draws repeat, and the training stream (dropout, shuffling) is left untouched.
    """

    def __init__(self, policy: str = "trivial", fill: Sequence[int] = (0, 0, 0), interpolation: str = "bilinear",
                 p: float = 1.0):
        super().__init__(p=p)
        if policy not in AUTO_AUGMENT_OPS:
            raise ConfigError(f"augment.auto_augment={policy} is unknown; use none, {', '.join(AUTO_AUGMENT_OPS)}")
        self.policy, self.fill, self.interpolation = policy, tuple(int(v) for v in fill), interpolation
        self.op = AUTO_AUGMENT_OPS[policy](interpolation=v2.InterpolationMode(interpolation), fill=list(self.fill))

    def get_params(self) -> dict[str, Any]:
        return {"torch_seed": int(self.random_generator.integers(0, 2**63 - 1))}

    def apply(self, img: np.ndarray, torch_seed: int = 0, **params: Any) -> np.ndarray:
        chw = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):  # CPU state only, restored on exit
            torch.default_generator.manual_seed(torch_seed)
            out = self.op(chw)
        return np.ascontiguousarray(out.permute(1, 2, 0).numpy())

    def get_transform_init_args_names(self) -> tuple[str, ...]:  # the repr (a feature-cache key): plain values
        return ("policy", "fill", "interpolation")


def _size(data_cfg: dict) -> int:
    return int(data_cfg["input_size"][-1])


def eval_resize_size(data_cfg: dict) -> int:
    """Short side before the center crop: floor(size / crop_pct), as timm computes it."""
    return math.floor(_size(data_cfg) / float(data_cfg.get("crop_pct", 1.0)))


def _normalize(data_cfg: dict) -> list:
    return [A.Normalize(mean=data_cfg["mean"], std=data_cfg["std"], max_pixel_value=255.0), ToTensorV2()]


def build_eval_transform(data_cfg: dict, *, grayscale_input: bool | None = None) -> A.Compose:
    """timm's eval transform: resize short side to size/crop_pct, center crop, normalize.

    `grayscale_input` (default: data_cfg["grayscale_input"]) replicates one grey channel into RGB.
    """
    interp = data_cfg.get("interpolation", "bilinear")
    squash = data_cfg.get("crop_mode", "center") == "squash"
    if data_cfg.get("crop_mode", "center") not in ("center", "squash"):
        _logger.warning("crop_mode=%s is not supported; using center crop", data_cfg["crop_mode"])
    ops = [ResizeShortSide(eval_resize_size(data_cfg), interp, squash=squash), CenterCropExact(_size(data_cfg))]
    if data_cfg.get("grayscale_input", False) if grayscale_input is None else grayscale_input:
        ops.append(A.ToGray(num_output_channels=3, p=1.0))
    return A.Compose(ops + _normalize(data_cfg))


def build_extra(specs: Iterable[dict]) -> list[A.BasicTransform]:
    """Albumentations transforms from config: [{name: CLAHE, p: 0.3, clip_limit: 2.0}, ...]."""
    ops = []
    for spec in specs or ():
        spec = dict(spec)
        name = spec.pop("name", None)
        cls = getattr(A, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            names = [n for n, c in vars(A).items() if isinstance(c, type) and issubclass(c, A.BasicTransform)]
            close = difflib.get_close_matches(str(name), names, n=3)
            hint = f"did you mean: {', '.join(close)}?" if close else "give {name: <Transform>, ...}"
            raise ConfigError(f"augment.extra: '{name}' is not an albumentations transform; {hint}")
        valid = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "args", "kwargs")]
        unknown = sorted(set(spec) - set(valid))
        if unknown:  # albumentations itself only warns about these
            raise ConfigError(f"augment.extra: {name} has no argument(s) {unknown}; valid: {', '.join(valid)}")
        try:
            ops.append(cls(**spec))
        except (TypeError, ValueError) as e:
            first = str(e).strip().splitlines()
            raise ConfigError(f"augment.extra: {name}({spec}) is invalid: {' '.join(first[:3])}") from None
    return ops


def _photometric(fill: tuple, *, color_jitter: float, blur: float, coarse_dropout: float) -> tuple[list, list]:
    colour = [A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0,
                            p=0.8)] if color_jitter else []
    if blur:
        colour.append(A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, 2.0), p=blur))
    late = [A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2),
                            fill=fill, p=coarse_dropout)] if coarse_dropout else []
    return colour, late


@dataclass(frozen=True)
class TrainAugment:
    """The train transform's knobs: the per-image keys of the `augment` group (conf/augment/*.yaml; mixup and
    cutmix mix whole batches: training/mixing.py). The defaults are the builder's, for benches and tests."""
    preset: str = "light"
    scale_min: float = 0.5
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    color_jitter: float = 0.0
    rotate: float = 0.0
    translate: float = 0.0
    shear: float = 0.0
    coarse_dropout: float = 0.0
    blur: float = 0.0
    grayscale_input: bool = False
    auto_augment: str = "none"
    random_erasing: float = 0.0
    extra: tuple = ()  # albumentations ops as {name: ..., **kwargs} (build_extra)

    @classmethod
    def from_group(cls, augment: Any) -> "TrainAugment":
        """The knobs of an `augment` config group (AugmentConfig node or dict); its batch-level keys are left."""
        knobs = {f.name: _plain(augment[f.name]) for f in fields(cls) if f.name in augment}
        return cls(**{**knobs, "extra": tuple(knobs.get("extra", ()))})


def build_train_transform(data_cfg: dict, knobs: TrainAugment = TrainAugment()) -> A.Compose:
    """Training pipeline; `preset=none` is the deterministic eval transform (domain knobs still apply).

    `auto_augment` (none | trivial | randaugment) runs after the geometric ops; `random_erasing` is the probability
    of A.Erasing (timm's defaults: 2-33% of the area, aspect 0.3-3.3, per-pixel random fill) before normalisation.
    """
    k = knobs
    if k.preset == "none":
        return build_eval_transform(data_cfg, grayscale_input=k.grayscale_input)
    size = _size(data_cfg)
    interp = INTERPOLATION.get(data_cfg.get("interpolation", "bilinear"), cv2.INTER_LINEAR)
    ops: list = [A.RandomResizedCrop(size=(size, size), scale=(k.scale_min, 1.0), interpolation=interp,
                                     area_for_downscale="image")]
    ops += [A.HorizontalFlip(p=0.5)] if k.hflip else []
    ops += [A.VerticalFlip(p=0.5)] if k.vflip else []
    ops += [A.RandomRotate90(p=1.0)] if k.rot90 else []
    if k.rotate or k.translate or k.shear:
        ops.append(A.Affine(rotate=(-k.rotate, k.rotate), translate_percent=(-k.translate, k.translate),
                            shear=(-k.shear, k.shear), interpolation=interp, border_mode=cv2.BORDER_REFLECT_101,
                            p=0.5))
    fill = tuple(int(round(255 * m)) for m in data_cfg["mean"])
    if k.auto_augment != "none":
        ops.append(AutoAugment(k.auto_augment, fill=fill, interpolation="bilinear"))
    colour, late = _photometric(fill, color_jitter=k.color_jitter, blur=k.blur, coarse_dropout=k.coarse_dropout)
    ops += colour + build_extra(k.extra)
    if k.random_erasing:  # before ToGray: a grey-input image stays grey
        ops.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), fill="random", p=k.random_erasing))
    ops += [A.ToGray(num_output_channels=3, p=1.0)] if k.grayscale_input else []
    return A.Compose(ops + late + _normalize(data_cfg))


def _plain(node: Any) -> Any:
    """Plain dicts and lists from a config node (OmegaConf's containers are a Mapping / Sequence)."""
    if isinstance(node, Mapping):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, Sequence) and not isinstance(node, str):
        return [_plain(v) for v in node]
    return node
