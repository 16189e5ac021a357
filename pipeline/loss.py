"""Loss stage."""
from __future__ import annotations

import torch

from pipeline.errors import ConfigError

LOSSES = ("ce",)


def build_loss(*, name: str = "ce", label_smoothing: float = 0.0,
               class_weights: torch.Tensor | None = None) -> torch.nn.Module:
    if name not in LOSSES:
        raise ConfigError(f"loss.name='{name}' is not valid; choose one of: {', '.join(LOSSES)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
    return torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
