"""Test-time augmentation (TTA) and temperature scaling as one module: what every consumer of a model runs.

`CalibratedClassifier(model, views, temperature)` returns the mean over `views` of `model(view(x))`, divided
by `temperature`. It scripts with TorchScript and exports to ONNX, so `pipeline.load`, the ONNX file and the
TorchScript file all compute the same calibrated logits. A checkpoint's JSON (best.json / model.json) says
what to apply: `"tta": ["identity", "hflip"]` (absent or ["identity"]: none) and `"temperature": T` (absent:
1.0); `wrap_for_inference(model, meta)` wraps a model accordingly, or returns it unchanged when neither applies.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import ModelFileError

VIEWS = ("identity", "hflip")  # hflip: mirrored along the width axis
PLAIN = ("identity",)
META_KEYS = ("tta", "temperature")  # the keys of a checkpoint's JSON read here


def apply_view(name: str, x: torch.Tensor) -> torch.Tensor:
    """One view of an (N, C, H, W) batch."""
    return _view(x, name == "hflip")


class CalibratedClassifier(nn.Module):
    """mean over `views` of model(view(x)), divided by `temperature` (logits in, logits out)."""

    def __init__(self, model: nn.Module, views: tuple[str, ...] = PLAIN, temperature: float = 1.0):
        super().__init__()
        unknown = [v for v in views if v not in VIEWS]
        if not views or unknown:
            raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {views}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        self.model = model
        self.views: list[str] = list(views)
        self.hflip: list[bool] = [v == "hflip" for v in views]  # TorchScript-friendly form of `views`
        self.temperature: float = float(temperature)
        self.divisor: float = len(views) * float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.model(_view(x, self.hflip[0]))
        for flip in self.hflip[1:]:
            total = total + self.model(_view(x, flip))
        return total / self.divisor


def _view(x: torch.Tensor, hflip: bool) -> torch.Tensor:
    return torch.flip(x, dims=[3]) if hflip else x


def inference_settings(meta: dict, source: str = "the model JSON") -> tuple[tuple[str, ...], float]:
    """(views, temperature) of a checkpoint's JSON; a one-line ModelFileError on a malformed value."""
    views, temperature = meta.get("tta") or list(PLAIN), meta.get("temperature", 1.0)
    if not isinstance(views, list) or not views or any(v not in VIEWS for v in views):
        raise ModelFileError(f"{source}: tta={views!r} is not a list of views from {list(VIEWS)}; "
                             "re-export the model")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ModelFileError(f"{source}: temperature={temperature!r} is not a positive number; re-export the model")
    return tuple(views), float(temperature)


def wrap_for_inference(model: nn.Module, meta: dict, source: str = "the model JSON") -> nn.Module:
    """`model` wrapped with the TTA views and temperature `meta` names; `model` itself when neither applies."""
    views, temperature = inference_settings(meta, source)
    if views == PLAIN and temperature == 1.0:
        return model
    return CalibratedClassifier(model, views, temperature).eval()
