"""Error gallery: the images a run gets most wrong (fastai's plot_top_losses), per evaluated split.

`top_losses_<split>.png` is a grid of the highest-loss images (loss = cross-entropy of the true class, so
the least confident right answers follow the confident wrong ones), each captioned with its true class and,
on the image, the predicted class, its probability and the loss (on dark red: a wrong prediction).
`top_losses_<split>.csv` lists the same rows with the file paths. Evaluation drops files that fail to
decode, so a row of logits is mapped back to its file by the split index the cached path recorded, or by
leaving out the files the run-time skip log names (the eval loaders keep the split's order); a mapping whose
labels do not match is not drawn.
`top_losses_<split>_cam.png` is the same grid as the model saw each image (resized, cropped), with the Grad-CAM of
the predicted class (model/gradcam.py) of the run's `best` checkpoint over it: the fine-tune's model, or on the
cached path the full model it assembles around the trained head; none for a backbone without a spatial feature map.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.data.augment import build_eval_transform
from pipeline.data.folder import Split
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.model import checkpoint
from pipeline.model.gradcam import NoFeatureMapError, cam_overlays
from pipeline.reports.preview_grid import render_grid
from pipeline.runtime.files import write_csv, write_image

_logger = logging.getLogger(__name__)

TILE = 128  # px per image
STRIP = 26  # px of the two-line label drawn at the bottom of each image
CAM_BATCH = 16  # images per Grad-CAM pass


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def per_image_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each row's true class: -log softmax(logits)[label]."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(1))
    return log_norm - z[np.arange(len(z)), np.asarray(labels)]


def decoded_rows(split: Split, labels: np.ndarray, skipped: set[str]) -> np.ndarray | None:
    """Split index of each evaluated row: the split's files in order, less the `skipped` paths; None (with a
    warning) when that does not give the evaluated labels."""
    rows = np.array([i for i, p in enumerate(split.paths) if p not in skipped], dtype=np.int64)
    if len(rows) != len(labels) or not np.array_equal(np.asarray(split.labels)[rows], labels):
        _logger.warning("top losses: %d evaluated rows do not match the %d decodable files of the split; "
                        "no gallery for it", len(labels), len(rows))
        return None
    return rows


def _tile(rgb: np.ndarray, lines: tuple[str, str], wrong: bool) -> np.ndarray:
    """The image fitted into a TILE square, with `lines` on a strip at its bottom (dark red: a wrong prediction)."""
    image = ImageOps.fit(Image.fromarray(rgb), (TILE, TILE))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.rectangle((0, TILE - STRIP, TILE, TILE), fill=(150, 0, 0) if wrong else (0, 0, 0))
    for k, text in enumerate(lines):
        draw.text((2, TILE - STRIP + 1 + 12 * k), text[: TILE // 6], fill=(255, 255, 255), font=font)
    return np.asarray(image)


def best_model(run_dir: Path) -> tuple[torch.nn.Module, dict] | None:
    """The run's `best` checkpoint as a model on CPU and its preprocessing (None without one), read by the one
    process that draws."""
    if not (Path(run_dir) / "best.safetensors").is_file():
        return None
    model, meta = checkpoint.load_checkpoint(run_dir, "best", local=True)
    return model, meta["preprocessing"]


def write_cam_grid(path: Path, best: tuple[torch.nn.Module, dict], views: list[torch.Tensor], classes: list[int],
                   strips: list[tuple[tuple[str, str], bool]], captions: list[str]) -> Path | None:
    """The gallery's Grad-CAM version: `views` (the model's inputs), each overlaid with the CAM of `classes[i]`."""
    model, preprocessing = best
    try:
        overlays = [o for k in range(0, len(views), CAM_BATCH) for o in cam_overlays(
            model, torch.stack(views[k:k + CAM_BATCH]), classes[k:k + CAM_BATCH], preprocessing)]
    except NoFeatureMapError as e:
        _logger.info("top losses: no Grad-CAM gallery (%s)", e)
        return None
    return write_image(path, render_grid([_tile(o, *strip) for o, strip in zip(overlays, strips)], captions))


def write_top_losses(run_dir: Path, name: str, split: Split, logits: np.ndarray, labels: np.ndarray,
                     rows: np.ndarray, n: int, best: tuple[torch.nn.Module, dict] | None = None) -> Path | None:
    """`top_losses_<name>.png` and `.csv` for the `n` highest-loss rows (`rows`: their split indices), and with
    `best` (model, preprocessing: `best_model`) `top_losses_<name>_cam.png`."""
    classes = split.classes
    probs, losses = softmax(logits), per_image_loss(logits, labels)
    transform = build_eval_transform(best[1]) if best is not None else None
    tiles, captions, table, strips, views, predicted = [], [], [], [], [], []
    for r in np.argsort(-losses, kind="stable"):
        if len(tiles) == n:
            break
        path, true, pred = split.paths[rows[r]], classes[labels[r]], classes[int(probs[r].argmax())]
        strip = ((f"pred: {pred}", f"p={probs[r].max():.2f} loss={losses[r]:.2f}"), pred != true)
        try:
            rgb = load_rgb(path)
            tiles.append(_tile(rgb, *strip))
        except (ImageDecodeError, OSError) as e:
            _logger.warning("top losses: skipping %s (%s)", path, e)
            continue
        if transform is not None:
            views.append(transform(image=rgb)["image"])
            predicted.append(int(probs[r].argmax()))
        strips.append(strip)
        captions.append(f"true: {true}")
        table.append([len(table) + 1, path, true, pred, round(float(probs[r].max()), 6),
                      round(float(probs[r][labels[r]]), 6), round(float(losses[r]), 6)])
    if not tiles:
        return None
    write_csv(run_dir / f"top_losses_{name}.csv", table,
              header=["rank", "path", "true", "predicted", "p_predicted", "p_true", "loss"])
    out = write_image(run_dir / f"top_losses_{name}.png", render_grid(tiles, captions))
    cam = best is not None and write_cam_grid(run_dir / f"top_losses_{name}_cam.png", best, views, predicted, strips,
                                              captions)
    _logger.info("Wrote top_losses_%s.png/.csv%s (%d highest-loss images)", name, " and _cam.png" if cam else "",
                 len(tiles))
    return out


def write_galleries(run_dir: Path, evals: dict, splits, *, n: int, skipped: list[dict],
                    rows: dict | None = None) -> None:
    """A gallery per split of `evals` ({split: (logits, labels)}); `rows`: known split indices per split,
    else derived from `skipped` (the run-time skip log's entries); `n` = 0: none. The Grad-CAM versions use
    the run's `best` checkpoint (none without one)."""
    skipped_paths, best = {e["path"] for e in skipped}, None
    for name, (logits, labels) in evals.items():
        split = getattr(splits, name)
        if not n or not len(labels):
            continue
        known = (rows or {}).get(name)
        index = known if known is not None else decoded_rows(split, labels, skipped_paths)
        if index is not None:
            best = best or best_model(Path(run_dir))
            write_top_losses(Path(run_dir), name, split, logits, labels, index, n, best)
