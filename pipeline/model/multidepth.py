"""Pooled features from several depths of a timm backbone, and the classifier that uses them.

A feature *level* is an index into the backbone's `feature_info` (for tf_efficientnet_lite0: 0..4, the
outputs of stages at stride 2, 4, 8, 16, 32), pooled by global averaging; `"head"` is the usual
pre-logits embedding (`forward_head(pre_logits=True)`). Earlier levels are more generic: for a small
dataset far from the pretraining domain, a linear head on them can beat the last layer.

Only torch and timm here: `pipeline.load` rebuilds exported multi-depth models from this module.
`resolve_levels` and `check_levels_need_cache` check `features.depths` at start-up (training/validate.py).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from pipeline.errors import ConfigError

HEAD = "head"
LOGITS = "logits"  # not a feature level: the model's own output, as the feature cache stores a teacher's logits


def normalize_levels(levels: Sequence) -> list:
    """Sorted unique int levels followed by "head" if present (the order features are concatenated in)."""
    ints = sorted({int(v) for v in levels if str(v) != HEAD})
    return ints + ([HEAD] if any(str(v) == HEAD for v in levels) else [])


def pooled_features(model: torch.nn.Module, images: torch.Tensor, levels: Sequence) -> torch.Tensor:
    """Concatenated pooled features of `levels` (see the module doc) for a batch of images."""
    if list(levels) == [LOGITS]:
        return model(images)
    ints = [v for v in levels if v != HEAD]
    if not ints:
        return model.forward_head(model.forward_features(images), pre_logits=True)
    use_head = HEAD in levels
    final, intermediates = model.forward_intermediates(images, indices=ints, stop_early=not use_head)
    parts = [t.mean(dim=(2, 3)) for t in intermediates]
    if use_head:
        parts.append(model.forward_head(final, pre_logits=True))
    return torch.cat(parts, dim=1)


def level_dims(model: torch.nn.Module, levels: Sequence) -> int:
    """Feature width of `levels` on `model`."""
    channels = [info["num_chs"] for info in model.feature_info]
    return sum(model.num_features if v == HEAD else channels[v] for v in levels)


class MultiDepthClassifier(torch.nn.Module):
    """`fc(concat(pooled features of levels))` over a timm backbone whose own classifier is unused."""

    def __init__(self, backbone: torch.nn.Module, levels: Sequence, num_classes: int):
        super().__init__()
        backbone.reset_classifier(0)
        self.backbone, self.levels = backbone, normalize_levels(levels)
        self.fc = torch.nn.Linear(level_dims(backbone, self.levels), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled_features(self.backbone, images, self.levels))


def uses_plain_head(levels: Sequence | None) -> bool:
    """True when the features are the standard pre-logits: the backbone's own classifier holds the head."""
    return not levels or list(normalize_levels(levels)) == [HEAD]


def create_classifier(arch: str, num_classes: int, feature_levels: Sequence | None = None) -> torch.nn.Module:
    """The model a checkpoint describes: a plain timm classifier, or a MultiDepthClassifier over `arch`."""
    import timm

    if uses_plain_head(feature_levels):
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    return MultiDepthClassifier(timm.create_model(arch, pretrained=False), feature_levels, num_classes)


def _as_list(depths) -> list:
    """`features.depths` as a list (a YAML list arrives as a ListConfig, a single level as a scalar)."""
    return list(depths) if isinstance(depths, Iterable) and not isinstance(depths, str) else [depths]


def resolve_levels(model: torch.nn.Module, depths) -> tuple[list, bool]:
    """(levels to extract, auto?) for `features.depths`: "auto", or a list of feature levels / "head"."""
    n = len(model.feature_info)
    if isinstance(depths, str) and depths == "auto":
        return list(range(n)) + [HEAD], True
    values = _as_list(depths)
    bad = [v for v in values if str(v) != HEAD and not (str(v).lstrip("-").isdigit() and 0 <= int(v) < n)]
    if not values or bad:
        raise ConfigError(f"features.depths={values} is not valid: use auto, or a list of feature levels 0..{n - 1} "
                          f"and/or '{HEAD}' (this backbone's levels: "
                          f"{[(i, f['module'], f['num_chs']) for i, f in enumerate(model.feature_info)]})")
    return normalize_levels(values), False


def check_levels_need_cache(depths, *, cached: bool, mode: str) -> None:
    """Feature levels other than the plain pre-logits exist only on the cached linear-probe path."""
    if not cached and (depths == "auto" or not uses_plain_head(_as_list(depths))):
        raise ConfigError(f"features.depths={depths} needs the cached linear probe, but the mode is {mode}; set "
                          "strategy=linear_probe features.cached=true, or drop features.depths")
