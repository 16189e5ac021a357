"""Augment stage: eval transform == timm's own, presets and domain knobs, extra transforms, preview grid."""
from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from conftest import CONF_DIR, compose_cfg
from pipeline.data.augment import build_eval_transform, build_train_transform, train_transform_from_cfg
from pipeline.data.images import load_rgb
from pipeline.errors import ConfigError

LITE0 = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
         "crop_pct": 0.875, "crop_mode": "center"}
IMAGENET = {"input_size": [3, 160, 160], "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "crop_pct": 0.95, "crop_mode": "center"}
PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "augment").glob("*.yaml") if not p.stem.startswith("_"))


def _ops(transform: A.Compose) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


@pytest.mark.parametrize("data_cfg", [LITE0, IMAGENET, {**LITE0, "input_size": [3, 96, 96]}])
def test_eval_transform_matches_timm_on_a_real_photo(data_cfg, tmp_path):
    photo = load_sample_image("flower.jpg")  # 427x640 RGB
    Image.fromarray(photo).save(tmp_path / "flower.jpg", quality=92)
    timm_tf = timm.data.create_transform(**{**data_cfg, "input_size": tuple(data_cfg["input_size"])},
                                         is_training=False)
    expected = timm_tf(Image.open(tmp_path / "flower.jpg").convert("RGB"))
    ours = build_eval_transform(data_cfg)(image=load_rgb(str(tmp_path / "flower.jpg")))["image"]
    assert ours.shape == expected.shape == (3, *data_cfg["input_size"][1:])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)  # same resize, crop offsets and decoder


def test_every_preset_builds_and_gives_model_sized_tensors():
    image = load_sample_image("china.jpg")
    for preset in PRESETS:
        cfg = compose_cfg([f"augment={preset}", "dataset=flowers"])
        out = train_transform_from_cfg(LITE0, cfg.augment)(image=image)["image"]
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32, preset
    heavy = train_transform_from_cfg(LITE0, compose_cfg(["augment=heavy", "dataset=flowers"]).augment)
    assert {"RandomResizedCrop", "HorizontalFlip", "ColorJitter", "Affine", "CoarseDropout"} <= set(_ops(heavy))
    assert not torch.equal(heavy(image=image)["image"], heavy(image=image)["image"])
    none = train_transform_from_cfg(LITE0, compose_cfg(["augment=none"]).augment)
    assert torch.equal(none(image=image)["image"], build_eval_transform(LITE0)(image=image)["image"])


def test_dataset_domain_knobs_win_over_the_preset():
    digits = compose_cfg(["augment=heavy"]).augment  # digits (default dataset) turns hflip off, scale_min 0.7
    ops = _ops(train_transform_from_cfg(LITE0, digits))
    assert "HorizontalFlip" not in ops and digits.scale_min == 0.7 and "Affine" in ops
    sat = build_train_transform(LITE0, preset="light", vflip=True, rot90=True)
    assert {"VerticalFlip", "RandomRotate90"} <= set(_ops(sat))
    assert "VerticalFlip" not in _ops(build_train_transform(LITE0, preset="light"))


def test_grayscale_input_gives_equal_channels_in_train_and_eval():
    image = load_sample_image("china.jpg")
    mean, std = np.array(IMAGENET["mean"])[:, None, None], np.array(IMAGENET["std"])[:, None, None]
    for tf in (build_train_transform(IMAGENET, preset="medium", color_jitter=0.3, grayscale_input=True),
               build_eval_transform({**IMAGENET, "grayscale_input": True})):
        pixels = tf(image=image)["image"].numpy() * std + mean
        assert np.abs(pixels[0] - pixels[1]).max() < 1e-5 and np.abs(pixels[1] - pixels[2]).max() < 1e-5
    colour = build_eval_transform(IMAGENET)(image=image)["image"].numpy() * std + mean
    assert np.abs(colour[0] - colour[2]).max() > 0.1


def test_extra_transforms_by_name_and_clear_errors():
    tf = build_train_transform(LITE0, extra=[{"name": "CLAHE", "p": 1.0, "clip_limit": 2.0}, {"name": "ToSepia"}])
    assert _ops(tf)[-4:-2] == ["CLAHE", "ToSepia"]
    with pytest.raises(ConfigError, match="'GausBlur' is not an albumentations transform; did you mean:.*GaussianBlur"):
        build_train_transform(LITE0, extra=[{"name": "GausBlur"}])
    with pytest.raises(ConfigError, match=r"CLAHE has no argument\(s\) \[.clip_limt.\]; valid: clip_limit"):
        build_train_transform(LITE0, extra=[{"name": "CLAHE", "clip_limt": 2}])
    with pytest.raises(ConfigError, match=r"augment.extra: CLAHE\(\{'clip_limit': 'lots'\}\) is invalid"):
        build_train_transform(LITE0, extra=[{"name": "CLAHE", "clip_limit": "lots"}])
    cfg = compose_cfg(["augment=light", "dataset=flowers", "+augment.extra=[{name: Sharpen, p: 0.5}]"])
    assert "Sharpen" in _ops(train_transform_from_cfg(LITE0, cfg.augment))
