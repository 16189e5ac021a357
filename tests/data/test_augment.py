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
from torchvision.transforms import v2

from conftest import CONF_DIR, compose_cfg
from pipeline.data.augment import AutoAugment, TrainAugment, build_eval_transform, build_train_transform
from pipeline.data.images import load_rgb
from pipeline.errors import ConfigError
from pipeline.runtime.seeding import seed_transform

LITE0 = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
         "crop_pct": 0.875, "crop_mode": "center"}
IMAGENET = {"input_size": [3, 160, 160], "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "crop_pct": 0.95, "crop_mode": "center"}
PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "augment").glob("*.yaml") if not p.stem.startswith("_"))


def _from_group(data_cfg: dict, group) -> A.Compose:
    return build_train_transform(data_cfg, TrainAugment.from_group(group))


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
        out = _from_group(LITE0, cfg.augment)(image=image)["image"]
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32, preset
    heavy = _from_group(LITE0, compose_cfg(["augment=heavy", "dataset=flowers"]).augment)
    assert {"RandomResizedCrop", "HorizontalFlip", "ColorJitter", "Affine", "CoarseDropout"} <= set(_ops(heavy))
    assert not torch.equal(heavy(image=image)["image"], heavy(image=image)["image"])
    none = _from_group(LITE0, compose_cfg(["augment=none"]).augment)
    assert torch.equal(none(image=image)["image"], build_eval_transform(LITE0)(image=image)["image"])


def test_dataset_domain_knobs_win_over_the_preset():
    digits = compose_cfg(["augment=heavy"]).augment  # digits (default dataset) turns hflip off, scale_min 0.7
    ops = _ops(_from_group(LITE0, digits))
    assert "HorizontalFlip" not in ops and digits.scale_min == 0.7 and "Affine" in ops
    sat = build_train_transform(LITE0, TrainAugment(preset="light", vflip=True, rot90=True))
    assert {"VerticalFlip", "RandomRotate90"} <= set(_ops(sat))
    assert "VerticalFlip" not in _ops(build_train_transform(LITE0, TrainAugment(preset="light")))


def test_grayscale_input_gives_equal_channels_in_train_and_eval():
    image = load_sample_image("china.jpg")
    mean, std = np.array(IMAGENET["mean"])[:, None, None], np.array(IMAGENET["std"])[:, None, None]
    for tf in (build_train_transform(IMAGENET, TrainAugment(preset="medium", color_jitter=0.3, grayscale_input=True)),
               build_eval_transform({**IMAGENET, "grayscale_input": True})):
        pixels = tf(image=image)["image"].numpy() * std + mean
        assert np.abs(pixels[0] - pixels[1]).max() < 1e-5 and np.abs(pixels[1] - pixels[2]).max() < 1e-5
    colour = build_eval_transform(IMAGENET)(image=image)["image"].numpy() * std + mean
    assert np.abs(colour[0] - colour[2]).max() > 0.1


def test_extra_transforms_by_name_and_clear_errors():
    tf = build_train_transform(LITE0, TrainAugment(extra=({"name": "CLAHE", "p": 1.0, "clip_limit": 2.0},
                                                          {"name": "ToSepia"})))
    assert _ops(tf)[-4:-2] == ["CLAHE", "ToSepia"]
    with pytest.raises(ConfigError, match="'GausBlur' is not an albumentations transform; did you mean:.*GaussianBlur"):
        build_train_transform(LITE0, TrainAugment(extra=[{"name": "GausBlur"}]))
    with pytest.raises(ConfigError, match=r"CLAHE has no argument\(s\) \[.clip_limt.\]; valid: clip_limit"):
        build_train_transform(LITE0, TrainAugment(extra=[{"name": "CLAHE", "clip_limt": 2}]))
    with pytest.raises(ConfigError, match=r"augment.extra: CLAHE\(\{'clip_limit': 'lots'\}\) is invalid"):
        build_train_transform(LITE0, TrainAugment(extra=[{"name": "CLAHE", "clip_limit": "lots"}]))
    cfg = compose_cfg(["augment=light", "dataset=flowers", "+augment.extra=[{name: Sharpen, p: 0.5}]"])
    assert "Sharpen" in _ops(_from_group(LITE0, cfg.augment))


def _auto_augment(transform: A.Compose) -> AutoAugment:
    return next(t for t in transform.transforms if isinstance(t, AutoAugment))


def test_strong_preset_adds_trivial_augment_and_erasing_and_repeats_under_a_seed():
    """augment=strong: torchvision's TrivialAugmentWide after crop/flip, albumentations' Erasing before normalising.
    Draws differ; the same seed (seeding.seed_transform) gives the same draws; torch's own RNG is left alone."""
    image = load_sample_image("china.jpg")
    strong = _from_group(LITE0, compose_cfg(["augment=strong", "dataset=flowers"]).augment)
    assert _ops(strong) == ["RandomResizedCrop", "HorizontalFlip", "AutoAugment", "Erasing", "Normalize",
                            "ToTensorV2"]
    assert isinstance(_auto_augment(strong).op, v2.TrivialAugmentWide)
    assert strong.transforms[3].p == 0.25 and strong.transforms[3].fill == "random"

    def draws(seed: int) -> list[torch.Tensor]:
        seed_transform(strong, seed)
        return [strong(image=image)["image"] for _ in range(4)]

    torch_state = torch.get_rng_state()
    first, again, other = draws(0), draws(0), draws(1)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[1])
    rebuilt = _from_group(LITE0, compose_cfg(["augment=strong", "dataset=flowers"]).augment)
    assert repr(strong) == repr(rebuilt) and "0x" not in repr(strong)  # a feature-cache key part
    assert "AutoAugment(p=1.0, policy='trivial', fill=(128, 128, 128), interpolation='bilinear')" in repr(strong)


def test_auto_augment_ops_change_the_image_and_randaugment_is_chosen_by_name():
    """The wrapped op really runs: on a fixed crop (scale 1, no flip) outputs vary with the draw and differ from the
    same pipeline without it. `auto_augment=randaugment` gives torchvision's RandAugment."""
    image = load_sample_image("flower.jpg")[:, :427]  # square: the crop keeps the whole image
    plain = build_train_transform(IMAGENET, TrainAugment(scale_min=1.0, hflip=False))
    base = plain(image=image)["image"]
    for policy, op in (("trivial", v2.TrivialAugmentWide), ("randaugment", v2.RandAugment)):
        tf = build_train_transform(IMAGENET, TrainAugment(scale_min=1.0, hflip=False, auto_augment=policy))
        assert isinstance(_auto_augment(tf).op, op)
        seed_transform(tf, 3)
        outs = [tf(image=image)["image"] for _ in range(6)]
        assert sum(not torch.allclose(o, base, atol=1e-3) for o in outs) >= 4, policy
        assert len({o.sum().item() for o in outs}) >= 4, policy
    with pytest.raises(ConfigError, match="augment.auto_augment=autoaug is unknown"):
        build_train_transform(IMAGENET, TrainAugment(auto_augment="autoaug"))


def test_random_erasing_puts_noise_into_a_flat_image():
    """A flat grey image stays flat through crop and flip; with random_erasing=1 a noisy rectangle appears."""
    flat = np.full((96, 96, 3), 90, np.uint8)
    base = build_train_transform(IMAGENET)(image=flat)["image"]
    assert float(base.flatten(1).std(1).max()) < 1e-4
    erasing = build_train_transform(IMAGENET, TrainAugment(random_erasing=1.0))
    seed_transform(erasing, 0)
    for _ in range(3):
        out = erasing(image=flat)["image"]
        changed = (out - base).abs().amax(0) > 1e-4
        assert changed.any()
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) / changed.numel()
        assert 0.01 < area < 0.4 and changed.float().mean() > 0.5 * area  # one rectangle of noise
