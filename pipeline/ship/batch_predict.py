"""Batch prediction to CSV (entry point: pipeline/predict.py, `make predict RUN=<export dir> IMAGES=...`).

Prints the top-k classes (with probabilities) per image and writes them to a CSV. A model with an `ood` rule
(`trainer.ood`) marks an image too unlike the training images UNKNOWN in the line and `unknown=true` in the CSV
(with its `ood_score`), and still gives its top-k. An image that does
not decode is reported (stderr and the CSV's `error` column) and the others are still predicted.
The probabilities are the softmax of `pipeline.load`'s logits, so they carry the export's TTA views and
temperature (model.json `tta`, `temperature`). With `cam_dir`, each predicted image also gets a Grad-CAM overlay of
its top class (model/gradcam.py; torch backend only), `<cam_dir>/<n>_<stem>.png`, named in the printed line and the
CSV's `cam` column. Like `pipeline.load`, this imports no Hydra and no training code.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from pipeline.data.images import IMAGE_EXTENSIONS, ImageDecodeError
from pipeline.errors import ConfigError, MissingFileError, PipelineError
from pipeline.model.gradcam import cam_overlays
from pipeline.runtime import owned
from pipeline.runtime.files import write_csv, write_image
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


def write_cams(model: LoadedModel, batch: torch.Tensor, rows: list[dict], classes: list[int], numbers: list[int],
               cam_dir: Path) -> None:
    """The Grad-CAM overlay of `classes[i]` for row i, `<cam_dir>/<number>_<stem>.png`; its path goes in row['cam']."""
    for row, number, image in zip(rows, numbers, cam_overlays(model.model, batch, classes,
                                                              model.meta["preprocessing"])):
        row["cam"] = str(write_image(cam_dir / f"{number:04d}_{Path(row['path']).stem}.png", Image.fromarray(image)))


def predict_paths(model: LoadedModel, paths: list[str], topk: int = 3, batch_size: int = 32,
                  cam_dir: Path | None = None) -> list[dict]:
    """One row per path, in order: {'path', 'top': [(class, prob), ...]} (with `cam_dir` also 'cam': the overlay
    of the top class, numbered by the image's place in `paths`) or {'path', 'error': reason}."""
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
            logits, scores = model.logits_and_scores(torch.stack(tensors))
            values, indices = torch.softmax(logits, dim=1).topk(k, dim=1)
            unknown = model.unknown(scores)
            good = iter(range(len(tensors)))
            for row in ok:
                if "error" not in row:
                    j = next(good)
                    row["top"] = [(model.class_names[i], v) for v, i in zip(values[j].tolist(), indices[j].tolist())]
                    if unknown is not None:
                        row["unknown"], row["ood_score"] = unknown[j], float(scores[j])
            if cam_dir is not None:
                predicted = [(start + j + 1, row) for j, row in enumerate(ok) if "error" not in row]
                write_cams(model, torch.stack(tensors), [row for _, row in predicted], indices[:, 0].tolist(),
                           [number for number, _ in predicted], cam_dir)
        rows += ok
    return rows


def write_predictions_csv(rows: list[dict], path: Path, topk: int, cam: bool = False, ood: bool = False) -> Path:
    """path, label_1, prob_1, ..., label_k, prob_k, (ood: unknown, ood_score,) (cam: the overlay file,) error."""
    header = (["path"] + [f"{c}_{i}" for i in range(1, topk + 1) for c in ("label", "prob")]
              + ["unknown", "ood_score"] * ood + ["cam"] * cam + ["error"])
    lines = []
    for row in rows:
        top = [x for name, p in row.get("top", []) for x in (name, f"{p:.6f}")]
        scored = [str(row["unknown"]).lower(), f"{row['ood_score']:.6g}"] if "unknown" in row else ["", ""]
        lines.append([row["path"], *top, *[""] * (2 * topk - len(top)), *scored * ood, *[row.get("cam", "")] * cam,
                      row.get("error", "")])
    return write_csv(path, lines, header=header)


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['path']}: UNREADABLE ({row['error']})"
    cam = f"; cam: {row['cam']}" if "cam" in row else ""
    unknown = "UNKNOWN (unlike the training images) | " if row.get("unknown") else ""
    return f"{row['path']}: {unknown}" + " | ".join(f"{name} {p:.3f}" for name, p in row["top"]) + cam


def prepare_cam_dir(cam_dir: str | None, csv_path: Path, backend: str) -> Path:
    """The folder for the overlays: `cam_dir`, else `<csv stem>_cam/` beside the CSV; new, empty or the pipeline's."""
    if backend != "torch":
        raise ConfigError(f"cam=true needs backend=torch (Grad-CAM takes gradients; backend={backend} gives none)")
    path = Path(cam_dir) if cam_dir else csv_path.with_name(f"{csv_path.stem}_cam")
    return owned.prepare_output_dir(path, "files", "choose another cam_dir=... (a new or empty folder)")


def run(export_dir: str, inputs: list[str], *, backend: str = "torch", topk: int = 3, csv_path: str | None = None,
        batch_size: int = 32, cam: bool = False, cam_dir: str | None = None) -> tuple[list[dict], Path]:
    """Predict every image under `inputs`, print the top-k, write the CSV; returns (rows, csv path). `cam` (or a
    `cam_dir`): also a Grad-CAM overlay per image (`prepare_cam_dir`)."""
    paths, ignored = collect_images(inputs)
    if ignored:
        _logger.info("Ignoring %d non-image file(s), e.g. %s", len(ignored), ignored[0])
    if not paths:
        raise MissingFileError(f"No image files in {' '.join(inputs)} "
                               f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    out = Path(csv_path or Path("outputs/predictions") / time.strftime("predictions_%Y-%m-%d_%H-%M-%S.csv"))
    cams = prepare_cam_dir(cam_dir, out, backend) if cam or cam_dir else None
    model = load(export_dir, backend=backend)
    k = min(topk, len(model.class_names))
    rows = predict_paths(model, paths, k, batch_size, cams)
    for row in rows:
        print(format_row(row), file=sys.stderr if "error" in row else sys.stdout)
    write_predictions_csv(rows, out, k, cams is not None, model.ood_threshold is not None)
    bad = sum("error" in r for r in rows)
    if bad == len(rows):
        raise PipelineError(f"None of the {len(rows)} images could be read (listed above); CSV: {out}")
    unknown = f", {sum(bool(r.get('unknown')) for r in rows)} unknown" if model.ood_threshold is not None else ""
    print(f"{len(rows) - bad} image(s) predicted{unknown}, {bad} unreadable; CSV: {out}"
          + (f"; Grad-CAM overlays: {cams}" if cams is not None else ""), file=sys.stderr)
    return rows, out
