"""Checkpoints that rebuild the model on their own: safetensors weights + a JSON sidecar.

`best` = `best.safetensors` + `best.json`; `last` = `last.pt`, the full training state for resuming
(pipeline/resume.py). Every file is written to `<name>.tmp`, fsynced, then renamed over the old one
(and the directory fsynced), so a crash or kill at any moment leaves the previous file or the new one,
never a half-written one; a failed write (disk full, unwritable dir) leaves the previous file intact.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import ConfigError, MissingFileError, OutputError
from pipeline.multidepth import create_classifier

_logger = logging.getLogger(__name__)

LAST = "last.pt"


class CheckpointWriteError(OutputError):
    """A checkpoint could not be written (disk full, unwritable or vanished output dir)."""


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """fsync the finished temp file and rename it over `path` (atomic on POSIX and Windows)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_bytes(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then commit it to `path`; on any OSError the temp file goes and `path` is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        _commit(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        hint = ("the disk is full: free space or set output_dir=... on another disk"
                if e.errno in (errno.ENOSPC, errno.EDQUOT) else
                "check that the output dir exists and is writable, or set output_dir=...")
        kept = "the previous version is intact" if path.exists() else "no previous version existed"
        raise CheckpointWriteError(f"Could not write {path} ({e.strerror or e}); {kept}; {hint}") from None
    _fsync_dir(path.parent)


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


def save_state(run_dir: str | Path, state: dict, name: str = LAST) -> Path:
    """Atomically `torch.save` a training state (tensors, numbers, strings, lists, dicts) as `run_dir/name`."""
    path = Path(run_dir) / name
    _atomic_write_bytes(path, lambda p: torch.save(state, p))
    return path


def load_state(path: str | Path) -> dict:
    """Load a `save_state` file with `weights_only=True` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"No training state at {path}: only runs started with this version write {LAST}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ConfigError(f"{path} is not a readable training state ({type(e).__name__}: {str(e)[:160]}); "
                          "delete it to start the run afresh") from None
