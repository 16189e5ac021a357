"""Speed options for the epoch loop: device, mixed precision, channels_last, torch.compile.

Each is measured by `make bench` (bench/bench.py) and on only where it helps. Defaults: `trainer.amp=auto`
is bf16 (or fp16 with a GradScaler where bf16 is unsupported) on CUDA and off on CPU, where bf16 autocast
made the training step slower on the CPUs we measured; channels_last and compile are opt-in.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ConfigError

_logger = logging.getLogger(__name__)


@dataclass
class Accel:
    """How batches run: autocast dtype (None = fp32), memory format, and the fp16 GradScaler."""
    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (async from pinned memory on CUDA), in the model's memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def select_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when visible, else CPU; `cuda` without a GPU is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `trainer.amp` on `device` (None = full fp32)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.amp=fp16 needs a CUDA device; on CPU use trainer.amp=bf16 or off")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def build_accel(device: torch.device, *, amp: str = "auto", channels_last: bool = False) -> Accel:
    dtype = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    if dtype is not None:
        _logger.info("Mixed precision: autocast %s on %s%s", dtype, device, " with a GradScaler" if scaler else "")
    return Accel(device, dtype, channels_last, scaler)


def prepare_model(model: torch.nn.Module, accel: Accel, *, compile_model: bool = False,
                  cache_dir: str | Path = "data/cache/inductor") -> torch.nn.Module:
    """channels_last weights and in-place `torch.compile` (state_dict keys unchanged, so checkpoints load
    without it); inductor's cache lives under `cache_dir` so a second run skips most compilation."""
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_model:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir).resolve()))
        model.compile()
        _logger.info("torch.compile: on (first steps compile; cache %s)", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return model
