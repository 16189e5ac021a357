"""`make preview dataset=X [augment=heavy]`: a PNG grid of augmented training samples with class names.

Each tile is exactly what the model receives (train transform incl. normalisation, mapped
back to pixels), so a person can check that crops, flips and colour changes keep the class
recognisable (a mirrored digit, a rotated X-ray, a hue-shifted rose...).
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.folder import Split
from pipeline.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb

_logger = logging.getLogger(__name__)

CAPTION = 14  # px of text strip above each tile
PAD = 2


def pick_samples(paths: list[str], labels: list[int], n: int, seed: int = 0) -> list[int]:
    """Indices of `n` samples, classes taken round-robin (each class shows up), seeded."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for members in by_class.values():
        rng.shuffle(members)
    order, queues = [], [by_class[c] for c in sorted(by_class)]
    while len(order) < min(n, len(paths)):
        for q in queues:
            if q and len(order) < n:
                order.append(q.pop())
    return order


def to_pixels(tensor: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """Undo Normalize + ToTensor: CHW float -> HWC uint8."""
    x = tensor.float().numpy().transpose(1, 2, 0) * np.array(std) + np.array(mean)
    return (x * 255.0).round().clip(0, 255).astype(np.uint8)


def grid_size(n: int, tile: int) -> tuple[int, int]:
    """(width, height) of the PNG for `n` tiles of side `tile`."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    return cols * (tile + PAD) + PAD, rows * (tile + CAPTION + PAD) + PAD


def render_grid(tiles: list[np.ndarray], captions: list[str]) -> Image.Image:
    """Tiles (same square size) on a white sheet, each with its caption above it."""
    tile = tiles[0].shape[0]
    cols = math.ceil(math.sqrt(len(tiles)))
    sheet = Image.new("RGB", grid_size(len(tiles), tile), (255, 255, 255))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for k, (img, text) in enumerate(zip(tiles, captions)):
        x = PAD + (k % cols) * (tile + PAD)
        y = PAD + (k // cols) * (tile + CAPTION + PAD)
        draw.text((x + 1, y + 1), text[: max(4, tile // 6)], fill=(0, 0, 0), font=font)
        sheet.paste(Image.fromarray(img), (x, y + CAPTION))
    return sheet


def write_preview(samples: Split, transform, data_cfg: dict, out: str | Path, *, n: int = 16, seed: int = 0,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Augment `n` of the training `samples` once each and save the grid PNG at `out`."""
    paths, labels = samples.paths, samples.labels
    tiles, captions = [], []
    for i in pick_samples(paths, labels, n * 2, seed):  # spare picks replace unreadable files
        if len(tiles) == n:
            break
        try:
            image = load_rgb(paths[i], max_pixels=max_pixels)
        except ImageDecodeError as e:
            _logger.warning("preview: skipping %s", e)
            continue
        tiles.append(to_pixels(transform(image=image)["image"], data_cfg["mean"], data_cfg["std"]))
        captions.append("|".join(samples.label_names(labels[i])) or "(no label)")
    if not tiles:
        from pipeline.errors import PipelineError
        raise PipelineError("preview: no readable training image found; run `make audit` on this dataset")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(tiles, captions).save(out)
    return out
