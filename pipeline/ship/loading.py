"""Load an exported model for inference: safetensors + JSON only, no Hydra, no pickle, no training code.

`load(path)` accepts an export dir (`model.json` + `model.safetensors`, written by `pipeline.export`), a
run dir (`best.json` + `best.safetensors`) or the path of such a `.json` file, and returns a `LoadedModel`:
the timm model (or an ONNX Runtime session) plus the exact eval preprocessing used at training time
(`pipeline.data.augment.build_eval_transform`). The JSON's `tta` views and `temperature` (training's
`trainer.tta` / `trainer.calibrate`) are applied to the torch model (model/calibrated.py); the ONNX graph
already holds them. A model with an `ood` rule (`trainer.ood`, model/ood.py) also scores how much each image looks
like the training data (`logits_and_scores`: torch from the weights file's `ood.` tensors, ONNX from the graph's
`ood_score` output); below `ood.threshold` an image is `unknown`.

The JSON is validated before anything is allocated from it (size, the type and range of
every field, file names: model/meta_check.py), every file it leads to must resolve inside the dir (a symlink
out of it is refused: `inside_dir`), and files listed with a sha256 in the JSON are verified first, so a
hostile, truncated or modified export fails with a one-line `ModelFileError` instead of a deep stack trace or
an out-of-memory kill. The sha256 proves integrity (the file is the one exported), not authenticity.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.data.augment import build_eval_transform
from pipeline.data.images import DEFAULT_MAX_PIXELS, load_rgb
from pipeline.errors import ConfigError, MissingFileError, ModelFileError, check_choice
from pipeline.model import ood
from pipeline.model.calibrated import wrap_for_inference
from pipeline.model.checkpoint import build_model, read_meta, read_weights

_logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")  # onnx-int8: the export's model_int8.onnx (ship/int8.py)
ImageInput = str | Path | np.ndarray  # a path, or an HxWx3 uint8 RGB array


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inside_dir(directory: Path, name: str, field: str) -> Path:
    """`directory / name`, refused unless it resolves (symlinks followed) to a path inside `directory`."""
    path = directory / name
    try:
        ok = path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        ok = False
    if not ok:
        raise ModelFileError(f"{path} ({field}) points outside {directory} (a symlink or a path out of the dir): "
                             "an export dir holds its own files; copy the real file in (cp -L) or re-export "
                             "with `make export RUN=<run dir>`")
    return path


def check_listed_files(directory: Path, meta: dict) -> None:
    """Every file the JSON's `files` table names that exists here resolves inside `directory`."""
    for name in meta.get("files") or {}:
        if os.path.lexists(directory / name):
            inside_dir(directory, name, f"files.{name}")


def verify_file(path: Path, meta: dict) -> None:
    """Check size and sha256 against the JSON's `files` entry (if the JSON lists the file)."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found: the export dir is incomplete; copy it again or re-export")
    expected = (meta.get("files") or {}).get(path.name)
    if not expected:
        return
    size = path.stat().st_size
    if "bytes" in expected and size != expected["bytes"]:
        raise ModelFileError(f"{path} has {size} bytes but model.json records {expected['bytes']} (truncated or "
                             "replaced); copy the export dir again or re-export")
    if "sha256" in expected and file_sha256(path) != expected["sha256"]:
        raise ModelFileError(f"{path} does not match the sha256 in model.json (file modified or damaged); "
                             "copy the export dir again or re-export")


def build_preprocess(preprocessing: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> Callable[[ImageInput], torch.Tensor]:
    """image path or HxWx3 uint8 RGB array -> normalized 3xHxW float tensor (the training-time eval transform)."""
    transform = build_eval_transform(preprocessing)

    def preprocess(image: ImageInput) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            image = load_rgb(str(image), max_pixels=max_pixels)  # raises images.ImageDecodeError
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ConfigError(f"preprocess expects an HxWx3 uint8 RGB array, got {image.dtype} {image.shape}")
        return transform(image=image)["image"]

    return preprocess


class OnnxModel:
    """ONNX Runtime session with a torch-like call: float tensor (N,3,H,W) -> logits tensor (N,K)."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelFileError(f"{path} is not a loadable ONNX model ({str(e).splitlines()[0][:160]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def scored(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, the graph's `ood_score` output or None where it has none)."""
        x = batch.detach().cpu().numpy().astype(np.float32, copy=False)
        out = self.session.run(None, {self.input_name: x})
        return torch.from_numpy(out[0]), torch.from_numpy(out[1]) if len(out) > 1 else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.scored(batch)[0]


@dataclass
class LoadedModel:
    """A ready classifier: `model` (torch module in eval mode with the JSON's TTA and temperature applied, or
    OnnxModel, whose graph holds them), its preprocessing, class names."""
    model: Callable[[torch.Tensor], torch.Tensor]
    preprocess: Callable[[ImageInput], torch.Tensor]
    class_names: list[str]
    meta: dict
    backend: str = "torch"
    device: str = "cpu"
    ood_score: torch.nn.Module | None = None  # torch: the unknown-image score on the features (model/ood.py)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) on CPU for a preprocessed batch (N, 3, H, W)."""
        return self.model(batch.to(self.device) if self.backend == "torch" else batch).float().cpu()

    @property
    def ood_threshold(self) -> float | None:
        """The score below which an image is `unknown` (model.json `ood`), or None: the model has no such rule."""
        record = self.meta.get(ood.KEY) or {}
        return None if "skipped" in record else record.get("threshold")

    @torch.inference_mode()
    def logits_and_scores(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, OOD scores: higher = more like the training images; None without an `ood` rule), one pass."""
        if self.ood_threshold is None:
            return self.logits(batch), None
        if self.backend != "torch":
            logits, scores = self.model.scored(batch)
            if scores is None:
                raise ModelFileError("model.json has an `ood` rule but the ONNX graph has no ood_score output; "
                                     "re-export the run")
            return logits.float(), scores.float()
        logits, features = ood.logits_and_features(self.model, batch.to(self.device))
        return logits.float().cpu(), self.ood_score(features).float().cpu()

    def unknown(self, scores: torch.Tensor | None) -> list[bool] | None:
        """Per image: its score is below the threshold that kept `ood.keep` of val; None without a rule."""
        return None if scores is None else [bool(v < self.ood_threshold) for v in scores.tolist()]

    def predict(self, images: Sequence[ImageInput], topk: int = 1) -> list[list[tuple[str, float]]]:
        """Top-k (class name, softmax probability) per image, best first."""
        return [row["top"] for row in self.classify(images, topk)]

    def classify(self, images: Sequence[ImageInput], topk: int = 1) -> list[dict]:
        """Per image {"top": top-k (class name, probability), "unknown": bool, "ood_score": float}; the last two
        only where the model has an `ood` rule."""
        if not images:
            return []
        logits, scores = self.logits_and_scores(torch.stack([self.preprocess(im) for im in images]))
        values, indices = torch.softmax(logits, dim=1).topk(min(max(1, topk), len(self.class_names)), dim=1)
        rows = [{"top": [(self.class_names[i], float(v)) for v, i in zip(vs, ix)]}
                for vs, ix in zip(values.tolist(), indices.tolist())]
        for row, flag, score in zip(rows, self.unknown(scores) or [], scores.tolist() if scores is not None else []):
            row.update(unknown=flag, ood_score=score)
        return rows


def locate(path: str | Path) -> tuple[Path, Path]:
    """(json, weights) for an export dir, a run dir, or a .json path (weights: same stem, .safetensors)."""
    path = Path(path).expanduser()
    if path.suffix == ".json":
        return path, path.with_suffix(".safetensors")
    if not path.is_dir():
        raise MissingFileError(f"{path} not found: pass an export dir (make export RUN=<run dir>) or a run dir")
    for stem in ("model", "best"):
        if (path / f"{stem}.json").is_file():
            return path / f"{stem}.json", path / f"{stem}.safetensors"
    raise MissingFileError(f"{path} has no model.json (export dir) or best.json (run dir); "
                           "export a finished run with `make export RUN=<run dir>`")


def load(path: str | Path, *, backend: str = "torch", weights: str | Path | None = None,
         device: str = "cpu", threads: int = 0) -> LoadedModel:
    """Load an exported model (see module docstring). `backend`: torch (safetensors) or onnx (model.onnx).

    `weights` overrides the weights file (.safetensors, or a .pth state dict read with weights_only=True);
    `threads` sets ONNX Runtime's intra-op threads (0 = its default).
    """
    check_choice("backend", backend, BACKENDS)
    json_path, weights_path = locate(path)
    meta = read_meta(json_path)  # validated before anything is allocated from it
    directory = json_path.parent
    check_listed_files(directory, meta)
    preprocess = build_preprocess(meta["preprocessing"])
    if backend == "onnx-int8":
        q = meta.get("int8") or {}
        if not q.get("file"):
            raise MissingFileError(f"{directory} has no int8 model ({q.get('why') or 'exported without export.int8'})"
                                   "; use backend=onnx, or re-export with export.int8=true")
    if backend in ("onnx", "onnx-int8"):
        field = "int8.file" if backend == "onnx-int8" else "onnx.file"
        onnx_path = directory / (meta["int8"]["file"] if backend == "onnx-int8"
                                 else (meta.get("onnx") or {}).get("file", "model.onnx"))
        if not onnx_path.is_file():
            raise MissingFileError(f"{onnx_path} not found: export with ONNX (make export RUN=<run> "
                                   "ARGS='--formats safetensors onnx') or use backend=torch")
        onnx_path = inside_dir(directory, onnx_path.name, field)
        verify_file(onnx_path, meta)
        model = OnnxModel(onnx_path, threads)
        check = model.session.get_outputs()[0].shape[-1]
        if isinstance(check, int) and check != meta["num_classes"]:
            raise ModelFileError(f"{onnx_path} outputs {check} classes but model.json says "
                                 f"num_classes={meta['num_classes']}")
        return LoadedModel(model, preprocess, list(meta["class_names"]), meta, backend, "cpu")
    if weights is None:
        weights_path = inside_dir(directory, weights_path.name, "weights")
        verify_file(weights_path, meta)
    else:
        weights_path = Path(weights)  # the caller's own file: read as given
        if (meta.get(ood.KEY) or {}).get("threshold") is not None:  # fitted on the exported weights' features
            meta = {**meta, ood.KEY: {"skipped": f"weights={weights_path} replaces the weights the rule was fitted on"}}
    state = read_weights(weights_path)
    model = build_model(meta, state, str(weights_path))
    model = wrap_for_inference(model, meta, str(json_path))  # TTA views + temperature, as exported
    score = ood.score_module(meta.get(ood.KEY), ood.split_weights(state)[1], str(weights_path))
    return LoadedModel(model.to(device), preprocess, list(meta["class_names"]), meta, "torch", device,
                       score.to(device) if score is not None else None)
