"""What a person reads of the data audit (docs/audit.md): its markdown section (audit.md, summary.md) and the
thumbnail sheets written next to audit.json: `near_duplicates.png` (each pair side by side in one tile,
captioned split/class | split/class) and `label_issues.png` (each candidate captioned given>suggested and
the probability of the given label), laid out by reports/preview.py `render_grid`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.audit import MAX_LISTED, audit_markdown
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.features.label_issues import label_issues_markdown
from pipeline.reports.preview import render_grid
from pipeline.runtime.files import write_image

PAIR_TILE = 224  # one pair per tile, each image in half of it; render_grid's captions hold tile // 6 characters
ISSUE_TILE = 128
GAP = 4  # px between the two images of a pair


def audit_section(report: dict) -> list[str]:
    """The `## Data audit` section: the data checks, then the label-error candidates when they were looked for."""
    return audit_markdown(report) + (label_issues_markdown(report["label_issues"]) if "label_issues" in report else [])


def _decode(path: str, side: int, max_pixels: int) -> Image.Image | None:
    try:
        return Image.fromarray(load_rgb(path, max_pixels=max_pixels, draft_size=side))
    except ImageDecodeError:  # changed or removed since the audit read it
        return None


def fit_thumbnail(image: Image.Image | None, width: int, height: int) -> np.ndarray:
    """`image` scaled to fit (width, height), centred on white; light grey when there is no image."""
    if image is None:
        return np.full((height, width, 3), 220, np.uint8)
    box = Image.new("RGB", (width, height), (255, 255, 255))
    image = ImageOps.contain(image, (width, height))
    box.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
    return np.asarray(box)


def pair_tile(images: list[Image.Image | None]) -> np.ndarray:
    """Two images in one square tile, earlier split first: side by side, or one above the other when both are
    landscape (each then gets twice the pixels)."""
    tile = np.full((PAIR_TILE, PAIR_TILE, 3), 255, np.uint8)
    half = (PAIR_TILE - GAP) // 2
    stacked = all(im is not None and im.width > im.height for im in images)
    for k, image in enumerate(images):
        at = k * (half + GAP)
        if stacked:
            tile[at:at + half, :] = fit_thumbnail(image, PAIR_TILE, half)
        else:
            tile[:, at:at + half] = fit_thumbnail(image, half, PAIR_TILE)
    return tile


def near_duplicate_sheet(pairs: list[dict], max_pixels: int) -> Image.Image:
    """The first MAX_LISTED pairs (closest first), captioned `split/class | split/class`."""
    tiles, captions = [], []
    for pair in pairs[:MAX_LISTED]:
        a, b = pair["files"]
        tiles.append(pair_tile([_decode(m["path"], PAIR_TILE, max_pixels) for m in (a, b)]))
        captions.append(f"{a['split']}/{a['class']} | {b['split']}/{b['class']}")
    return render_grid(tiles, captions)


def label_issue_sheet(candidates: list[dict], max_pixels: int) -> Image.Image:
    """Each candidate, most doubtful first, captioned `given>suggested p(given)`."""
    tiles = [fit_thumbnail(_decode(c["path"], ISSUE_TILE, max_pixels), ISSUE_TILE, ISSUE_TILE) for c in candidates]
    return render_grid(tiles, [f"{c['given']}>{c['suggested']} {c['p_given']:.2f}" for c in candidates])


def write_audit_sheets(out_dir: str | Path, report: dict, max_pixels: int) -> list[Path]:
    """near_duplicates.png and label_issues.png in `out_dir`, each when the report has something to show."""
    written = []
    pairs = report.get("near_duplicates", {}).get("pairs")
    if pairs:
        written.append(write_image(Path(out_dir) / "near_duplicates.png", near_duplicate_sheet(pairs, max_pixels)))
    candidates = report.get("label_issues", {}).get("candidates")
    if candidates:
        written.append(write_image(Path(out_dir) / "label_issues.png", label_issue_sheet(candidates, max_pixels)))
    return written
