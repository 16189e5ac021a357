"""Error gallery: the images a run gets most wrong (fastai's plot_top_losses), per evaluated split.

`top_losses_<split>.png` is a grid of the highest-loss images (loss = cross-entropy of the true class, so
the least confident right answers follow the confident wrong ones), each captioned with its true class and,
on the image, the predicted class, its probability and the loss (on dark red: a wrong prediction).
`top_losses_<split>.csv` lists the same rows with the file paths. Evaluation drops files that fail to
decode, so a row of logits is mapped back to its file by the split index the cached path recorded, or by
leaving out the files the run-time skip log names (the eval loaders keep the split's order); a mapping whose
labels do not match is not drawn.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.data.folder import Split
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.reports.preview_grid import render_grid
from pipeline.runtime.files import write_csv, write_image

_logger = logging.getLogger(__name__)

TILE = 128  # px per image
STRIP = 26  # px of the two-line label drawn at the bottom of each image


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


def _tile(path: str, lines: tuple[str, str], wrong: bool) -> np.ndarray:
    """The image fitted into a TILE square, with `lines` on a strip at its bottom (dark red: a wrong prediction)."""
    image = ImageOps.fit(Image.fromarray(load_rgb(path)), (TILE, TILE))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.rectangle((0, TILE - STRIP, TILE, TILE), fill=(150, 0, 0) if wrong else (0, 0, 0))
    for k, text in enumerate(lines):
        draw.text((2, TILE - STRIP + 1 + 12 * k), text[: TILE // 6], fill=(255, 255, 255), font=font)
    return np.asarray(image)


def write_top_losses(run_dir: Path, name: str, split: Split, logits: np.ndarray, labels: np.ndarray,
                     rows: np.ndarray, n: int) -> Path | None:
    """`top_losses_<name>.png` and `.csv` for the `n` highest-loss rows (`rows`: their split indices)."""
    classes = split.classes
    probs, losses = softmax(logits), per_image_loss(logits, labels)
    tiles, captions, table = [], [], []
    for r in np.argsort(-losses, kind="stable"):
        if len(tiles) == n:
            break
        path, true, pred = split.paths[rows[r]], classes[labels[r]], classes[int(probs[r].argmax())]
        try:
            tiles.append(_tile(path, (f"pred: {pred}", f"p={probs[r].max():.2f} loss={losses[r]:.2f}"), pred != true))
        except (ImageDecodeError, OSError) as e:
            _logger.warning("top losses: skipping %s (%s)", path, e)
            continue
        captions.append(f"true: {true}")
        table.append([len(table) + 1, path, true, pred, round(float(probs[r].max()), 6),
                      round(float(probs[r][labels[r]]), 6), round(float(losses[r]), 6)])
    if not tiles:
        return None
    write_csv(run_dir / f"top_losses_{name}.csv", table,
              header=["rank", "path", "true", "predicted", "p_predicted", "p_true", "loss"])
    out = write_image(run_dir / f"top_losses_{name}.png", render_grid(tiles, captions))
    _logger.info("Wrote top_losses_%s.png/.csv (%d highest-loss images)", name, len(tiles))
    return out


def write_galleries(run_dir: Path, evals: dict, splits, *, n: int, skipped: list[dict],
                    rows: dict | None = None) -> None:
    """A gallery per split of `evals` ({split: (logits, labels)}); `rows`: known split indices per split,
    else derived from `skipped` (the run-time skip log's entries); `n` = 0: none."""
    skipped_paths = {e["path"] for e in skipped}
    for name, (logits, labels) in evals.items():
        split = getattr(splits, name)
        if not n or not len(labels):
            continue
        known = (rows or {}).get(name)
        index = known if known is not None else decoded_rows(split, labels, skipped_paths)
        if index is not None:
            write_top_losses(Path(run_dir), name, split, logits, labels, index, n)
