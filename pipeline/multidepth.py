"""Pooled features from several depths of a timm backbone, and the classifier that uses them.

A feature *level* is an index into the backbone's `feature_info` (for tf_efficientnet_lite0: 0..4, the
outputs of stages at stride 2, 4, 8, 16, 32), pooled by global averaging; `"head"` is the usual
pre-logits embedding (`forward_head(pre_logits=True)`). Earlier levels are more generic: for a small
dataset far from the pretraining domain, a linear head on them can beat the last layer.

Only torch and timm here: `pipeline.load` rebuilds exported multi-depth models from this module.
"""
from __future__ import annotations

from typing import Sequence

import torch

HEAD = "head"


def normalize_levels(levels: Sequence) -> list:
    """Sorted unique int levels followed by "head" if present (the order features are concatenated in)."""
    ints = sorted({int(v) for v in levels if str(v) != HEAD})
    return ints + ([HEAD] if any(str(v) == HEAD for v in levels) else [])


def pooled_features(model: torch.nn.Module, images: torch.Tensor, levels: Sequence) -> torch.Tensor:
    """Concatenated pooled features of `levels` (see the module doc) for a batch of images."""
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
