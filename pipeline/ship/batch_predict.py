"""Batch prediction to CSV (entry point: pipeline/predict.py, `make predict RUN=<export dir> IMAGES=...`).

Prints the top-k classes (with probabilities) per image and writes them to a CSV. An image that does
not decode is reported (stderr and the CSV's `error` column) and the others are still predicted.
The probabilities are the softmax of `pipeline.load`'s logits, so they carry the export's TTA views and
temperature (model.json `tta`, `temperature`). Like `pipeline.load`, this imports no Hydra and no training code.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from pipeline.data.images import IMAGE_EXTENSIONS, ImageDecodeError
from pipeline.errors import MissingFileError, PipelineError
from pipeline.runtime.files import write_csv
from pipeline.ship.loading import LoadedModel, load

_logger = logging.getLogger(__name__)



def collect_images(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(image files, other files ignored): files as given, folders searched recursively by extension."""
    images, ignored = [], []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            images.append(str(path))
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
                    (images if p.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(str(p))
        else:
            raise MissingFileError(f"Image path not found: {path} (pass image files or folders)")
    return images, ignored


@torch.inference_mode()
def predict_paths(model: LoadedModel, paths: list[str], topk: int = 3, batch_size: int = 32) -> list[dict]:
    """One row per path, in order: {'path', 'top': [(class, prob), ...]} or {'path', 'error': reason}."""
    rows: list[dict] = []
    k = min(topk, len(model.class_names))
    for start in range(0, len(paths), batch_size):
        chunk, tensors, ok = paths[start:start + batch_size], [], []
        for path in chunk:
            try:
                tensors.append(model.preprocess(path))
                ok.append({"path": path})
            except ImageDecodeError as e:
                ok.append({"path": path, "error": str(e).removeprefix(f"{path}: ")})
        if tensors:
            probs = torch.softmax(model.logits(torch.stack(tensors)), dim=1)
            values, indices = probs.topk(k, dim=1)
            good = iter(zip(values.tolist(), indices.tolist()))
            for row in ok:
                if "error" not in row:
                    vs, ix = next(good)
                    row["top"] = [(model.class_names[i], v) for v, i in zip(vs, ix)]
        rows += ok
    return rows


def write_predictions_csv(rows: list[dict], path: Path, topk: int) -> Path:
    """path, label_1, prob_1, ..., label_k, prob_k, error."""
    header = ["path"] + [f"{c}_{i}" for i in range(1, topk + 1) for c in ("label", "prob")] + ["error"]
    lines = []
    for row in rows:
        top = [x for name, p in row.get("top", []) for x in (name, f"{p:.6f}")]
        lines.append([row["path"], *top, *[""] * (2 * topk - len(top)), row.get("error", "")])
    return write_csv(path, lines, header=header)


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['path']}: UNREADABLE ({row['error']})"
    return f"{row['path']}: " + " | ".join(f"{name} {p:.3f}" for name, p in row["top"])


def run(export_dir: str, inputs: list[str], *, backend: str = "torch", topk: int = 3, csv_path: str | None = None,
        batch_size: int = 32) -> tuple[list[dict], Path]:
    """Predict every image under `inputs`, print the top-k, write the CSV; returns (rows, csv path)."""
    paths, ignored = collect_images(inputs)
    if ignored:
        _logger.info("Ignoring %d non-image file(s), e.g. %s", len(ignored), ignored[0])
    if not paths:
        raise MissingFileError(f"No image files in {' '.join(inputs)} "
                               f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    model = load(export_dir, backend=backend)
    k = min(topk, len(model.class_names))
    rows = predict_paths(model, paths, k, batch_size)
    for row in rows:
        print(format_row(row), file=sys.stderr if "error" in row else sys.stdout)
    out = Path(csv_path or Path("outputs/predictions") / time.strftime("predictions_%Y-%m-%d_%H-%M-%S.csv"))
    write_predictions_csv(rows, out, k)
    bad = sum("error" in r for r in rows)
    if bad == len(rows):
        raise PipelineError(f"None of the {len(rows)} images could be read (listed above); CSV: {out}")
    print(f"{len(rows) - bad} image(s) predicted, {bad} unreadable; CSV: {out}", file=sys.stderr)
    return rows, out
