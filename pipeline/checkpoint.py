"""Checkpoints that rebuild the model on their own: safetensors weights + a JSON sidecar."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import ConfigError, MissingFileError
from pipeline.multidepth import create_classifier


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, name: str, model: torch.nn.Module, meta: dict) -> Path:
    """Write `<name>.safetensors` and `<name>.json` (arch, num_classes, class names, preprocessing, ...)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(run_dir / f"{name}.safetensors", lambda p: save_file(weights, str(p)))
    text = json.dumps(meta, indent=2, default=str)
    _atomic_write_bytes(run_dir / f"{name}.json", lambda p: p.write_text(text))
    return run_dir / f"{name}.safetensors"


def load_checkpoint(run_dir: str | Path, name: str = "best") -> tuple[torch.nn.Module, dict]:
    """Rebuild the timm model described by `<name>.json` and load `<name>.safetensors` (eval mode)."""
    run_dir = Path(run_dir)
    meta_path, weights_path = run_dir / f"{name}.json", run_dir / f"{name}.safetensors"
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise MissingFileError(f"Checkpoint file missing: {p} (is {run_dir} a finished run dir?)")
    meta = json.loads(meta_path.read_text())
    model = create_classifier(meta["arch"], meta["num_classes"], meta.get("feature_levels"))
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{weights_path} does not match {meta_path} (arch {meta['arch']}, "
                         f"{meta['num_classes']} classes): {str(e)[:200]}") from None
    return model.eval(), meta
