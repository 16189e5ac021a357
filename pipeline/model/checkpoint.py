"""Checkpoints that rebuild the model on their own, and the one reader of weights and model JSON files.

`best` = `best.safetensors` + `best.json` (arch, classes, preprocessing, ...), committed as one generation: the
JSON also sits in the safetensors header, written atomically with the weights (`save_weights`), and
`read_checkpoint_meta` rewrites a `best.json` left behind by a kill. An export dir holds the same pair as
`model.safetensors` + `model.json`. `last` = `last.pt`, the full training state for resuming
(training/resume.py). Every file goes through runtime/files.py: complete or not at all.

Reading is shared by training (best after fit, resume), export and `pipeline.load`: `read_weights` (any
state-dict file, wrappers unwrapped by `unwrap_state_dict`), `read_meta` (the JSON, validated) and
`build_model` (strict load with a clear mismatch message). This module imports only torch, timm and
safetensors, so `pipeline.load` stays light.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.errors import MissingFileError, ModelFileError
from pipeline.model import ensemble, meta_check, ood
from pipeline.model.multidepth import create_classifier
from pipeline.runtime import distributed
from pipeline.runtime.files import write_atomic, write_json

_logger = logging.getLogger(__name__)

LAST = "last.pt"
REQUIRED_KEYS = ("arch", "num_classes", "class_names", "preprocessing")
ARCH_KEYS = ("feature_levels", ensemble.KEY)  # the optional keys `create_model` reads: an export copies them
# (and `ood`, the unknown-image rule: model/ood.py)
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")  # timm / Lightning / torchvision checkpoint wrappers


META_KEY = "pipeline.meta"  # the JSON, committed with the weights in the safetensors header


def save_checkpoint(run_dir: str | Path, name: str, model: torch.nn.Module, meta: dict) -> Path:
    """Write `<name>.safetensors` and `<name>.json` (arch, num_classes, class names, preprocessing, ...)."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_weights(run_dir, name, weights, meta)


def save_weights(run_dir: str | Path, name: str, weights: dict[str, torch.Tensor], meta: dict) -> Path:
    """One generation of a checkpoint: the weights and their JSON go in one atomic write (the JSON in the
    safetensors header: the commit point), then `<name>.json`, its readable copy. A kill between the two leaves
    the copy one generation behind; `read_checkpoint_meta` puts it right before anything reads it."""
    run_dir = Path(run_dir)
    text = json.dumps(meta, default=str)
    write_atomic(run_dir / f"{name}.safetensors", lambda p: save_file(weights, str(p), metadata={META_KEY: text}))
    write_json(run_dir / f"{name}.json", json.loads(text))
    return run_dir / f"{name}.safetensors"


def embedded_meta(weights_path: str | Path) -> dict | None:
    """The JSON committed inside a `save_weights` file's header (read alone, no tensor), or None (older files,
    exports, an unreadable header: `read_weights` then says what is wrong)."""
    try:
        with safe_open(str(weights_path), "pt") as f:
            text = (f.metadata() or {}).get(META_KEY)
        return json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - SafetensorError, OSError, JSON: the weights reader reports the damage
        return None


def read_checkpoint_meta(run_dir: str | Path, name: str = "best") -> dict:
    """`<name>.json` of a run dir, validated, after making it agree with the weights' committed JSON (rewritten
    from it when a kill came between `save_weights`' two writes)."""
    meta_path = Path(run_dir) / f"{name}.json"
    committed = embedded_meta(Path(run_dir) / f"{name}.safetensors")
    if committed is not None:
        try:
            copy = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            copy = None
        if copy != committed:
            _logger.info("%s was behind its weights (a run stopped between the two writes): rewritten", meta_path)
            write_json(meta_path, committed)
    return read_meta(meta_path)


def update_meta(run_dir: str | Path, name: str, **values) -> dict:
    """Add `values` to a checkpoint's JSON, as a new generation of the pair (weights rewritten with it)."""
    run_dir = Path(run_dir)
    meta = {**read_checkpoint_meta(run_dir, name), **values}
    save_weights(run_dir, name, read_weights(run_dir / f"{name}.safetensors"), meta)
    return meta


def unwrap_state_dict(obj, source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, out of the usual wrappers (`WRAPPER_KEYS`, DDP's `module.` prefix)."""
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{source} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_weights(path: str | Path, *, what: str = "Weights file") -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or any other file as a state dict read with `weights_only=True`
    (pickled objects are refused). `what` names the setting in the error (e.g. backbone.weights)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: all the same user problem
            raise ModelFileError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                                 f"{str(e)[:120]}); it is truncated or damaged: copy it again or re-export") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated, foreign or pickled-object file
        raise ModelFileError(f"Cannot read weights file {path}: not a plain state dict of tensors (read with "
                             f"weights_only=True, pickled objects are refused): {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}") from None
    return unwrap_state_dict(obj, path)


def read_meta(path: str | Path) -> dict:
    """Parse and validate a model.json / best.json: size-bounded read, then the type and range of every field
    inference uses and every file name it holds (model/meta_check.py), before anything is built from it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found: expected an export dir (make export RUN=<run dir>) or a run dir")
    meta = meta_check.read_json_bounded(path)
    if not isinstance(meta, dict):
        raise meta_check.invalid(str(path), "the JSON", meta, "an object with " + ", ".join(REQUIRED_KEYS))
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if not missing and not isinstance(meta["preprocessing"], dict):
        raise meta_check.invalid(str(path), "preprocessing", meta["preprocessing"], "an object")
    missing += [f"preprocessing.{k}" for k in PREPROCESSING_KEYS if not missing and k not in meta["preprocessing"]]
    if missing:
        raise ModelFileError(f"{path} lacks {', '.join(missing)}; re-export the model with `make export`")
    meta_check.check_meta(meta, str(path))
    return meta


def build_model(meta: dict, state_dict: dict[str, torch.Tensor], source: str | Path) -> torch.nn.Module:
    """The timm model `meta` describes with `state_dict` loaded strictly (eval mode); one-line error on mismatch."""
    import timm

    arch, n = meta["arch"], meta["num_classes"]
    if not timm.is_model(arch):
        raise ModelFileError(f"arch '{arch}' in the model JSON is not a model of the installed timm {timm.__version__}")
    model = create_model(meta)
    own = model.state_dict()
    state_dict = ood.split_weights(state_dict)[0]  # the unknown-image score's tensors are not the model's
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {list(state_dict[k].shape)} in the file vs {list(v.shape)} expected" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if shapes:
        problems.append(f"shape mismatch: {shapes[0]}" + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if problems:
        raise ModelFileError(f"Weights {source} do not match their JSON (arch={arch}, num_classes={n}): "
                             + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def create_model(meta: dict) -> torch.nn.Module:
    """The untrained module a checkpoint's JSON describes: a timm classifier (feature_levels: the multi-depth
    linear probe), or an EnsembleClassifier of such members (`ensemble`)."""
    arch, n = meta["arch"], meta["num_classes"]
    spec = meta.get(ensemble.KEY)
    if not spec:
        return create_classifier(arch, n, meta.get("feature_levels"))
    members = spec["members"]
    return ensemble.EnsembleClassifier([create_classifier(arch, n, m.get("feature_levels")) for m in members],
                                       [m["temperature"] for m in members])


def load_checkpoint(run_dir: str | Path, name: str = "best", *, local: bool = False) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of `<name>.json` + `<name>.safetensors` in `run_dir` (eval mode). Under torchrun rank 0
    reads the files and broadcasts meta and weights (no shared filesystem needed), so every rank must call it;
    `local`: this process reads them alone (work only rank 0 does)."""
    run_dir = Path(run_dir)

    def read() -> tuple[dict, dict]:
        meta_path, weights_path = run_dir / f"{name}.json", run_dir / f"{name}.safetensors"
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise MissingFileError(f"Checkpoint file missing: {p} (is {run_dir} a finished run dir?)")
        return read_checkpoint_meta(run_dir, name), read_weights(weights_path)

    meta, weights = read() if local else distributed.from_main(read)
    return build_model(meta, weights, run_dir / f"{name}.safetensors"), meta


def save_state(run_dir: str | Path, state: dict, name: str = LAST) -> Path:
    """Atomically `torch.save` a training state (tensors, numbers, strings, lists, dicts) as `run_dir/name`."""
    return write_atomic(Path(run_dir) / name, lambda p: torch.save(state, p))


def load_state(path: str | Path) -> dict:
    """Load a `save_state` file with `weights_only=True` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"No training state at {path}: only runs started with this version write {LAST}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ModelFileError(f"{path} is not a readable training state ({type(e).__name__}: {str(e)[:160]}); "
                             "delete it to start the run afresh") from None
