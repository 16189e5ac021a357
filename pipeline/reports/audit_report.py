"""What a person reads of the data audit (docs/audit.md): its markdown section (audit.md, summary.md) and the
thumbnail sheets written next to audit.json: `near_duplicates.png` (each pair side by side in one tile,
captioned split/class | split/class) and `label_issues.png` (each candidate captioned given>suggested and
the probability of the given label), laid out by reports/preview_grid.py `render_grid`; for multi-label data the
label co-occurrence matrix, `label_cooccurrence.png`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.data import near_duplicates, shortcuts
from pipeline.data.data_audit import MAX_LISTED
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.features.label_issues import label_issues_markdown
from pipeline.reports import plots
from pipeline.reports.preview_grid import render_grid
from pipeline.runtime.files import write_image, write_json

PAIR_TILE = 224  # one pair per tile, each image in half of it; render_grid's captions hold tile // 6 characters
ISSUE_TILE = 128
GAP = 4  # px between the two images of a pair
COOCCURRENCE_PNG = "label_cooccurrence.png"  # multi-label data


def _example_lines(title: str, groups: list[dict]) -> list[str]:
    if not groups:
        return []
    lines = [f"**{title}: {len(groups)} group(s)**", ""]
    for g in groups[:MAX_LISTED]:
        lines.append("- " + " = ".join(f"`{f['split']}/{f['class']}/{Path(f['path']).name}`" for f in g["files"]))
    if len(groups) > MAX_LISTED:
        lines.append(f"- ... {len(groups) - MAX_LISTED} more in audit.json")
    return lines + [""]


def audit_markdown(report: dict) -> list[str]:
    """A readable `## Data audit` section (summary.md and audit.md)."""
    lines = ["## Data audit", ""] + [f"> **{w}**" for w in report["warnings"]] + ([""] if report["warnings"] else [])
    cols = ("images", "formats", "modes", "grey content", "width min/med/max", "height min/med/max", "below input")
    lines += ["| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, st in report["splits"].items():
        size = lambda d: "/".join(str(d.get(k, "-")) for k in ("min", "median", "max"))
        lines.append(f"| {name} | {st['images']} | {st['formats']} | {st['modes']} | {st['gray_content']} | "
                     f"{size(st['width'])} | {size(st['height'])} | {st['short_side_below_input']['count']} |")
    s = report["summary"]
    lines += ["", f"- val split: {report['val_source']} (split names below are logical splits)",
              f"- unreadable/skipped: {s['unreadable']}, extension does not match content: "
              f"{s['extension_mismatch']}, odd colour modes: {s['odd_modes']}, few colours: {s['few_colors']}, "
              f"stray files: {s['stray_files']}",
              f"- duplicates: {s['within_split_groups']} group(s) within a split, {s['cross_split_groups']} across "
              f"splits ({s['eval_files_leaked']} eval file(s) leaked), {s['label_conflict_groups']} under different "
              f"labels; dedup: {report['dedup']['mode']} ({len(report['dedup']['dropped'])} dropped)", ""]
    for key, title in (("extension_mismatch", "Extension does not match content"), ("odd_modes", "Odd colour modes"),
                       ("few_colors", "Few distinct colours"), ("stray_files", "Stray files (not in a class folder)")):
        items = report[key][:MAX_LISTED]
        if items:
            detail = lambda i: f"`{i}`" if isinstance(i, str) else \
                f"`{i['path']}`: {i.get('format') or i.get('mode') or i.get('colors')}"
            lines += [f"**{title}**", ""] + [f"- {detail(i)}" for i in items] + [""]
    d = report["duplicates"]
    lines += _example_lines("Across splits (leakage)", d["cross_split"])
    lines += _example_lines("Same file under different labels", d["label_conflicts"])
    lines += _example_lines("Within a split", d["within_split"])
    if "near_duplicates" in report:
        lines += near_duplicates.near_duplicate_markdown(report["near_duplicates"], MAX_LISTED)
    if "shortcuts" in report:
        lines += shortcuts.shortcut_markdown(report["shortcuts"], MAX_LISTED)
    elif report.get("shortcuts_skipped"):
        lines += [f"- storage shortcuts: not checked ({report['shortcuts_skipped']})", ""]
    if report.get("multilabel"):
        lines += multilabel_markdown(report)
    return lines


def multilabel_markdown(report: dict) -> list[str]:
    """Multi-label data: images per label in each split, images with no label, labels per image, rare labels."""
    ml, names = report["multilabel"], list(report["splits"])
    lines = ["**Labels** (multi-label data: images carrying each label; co-occurrence in "
             f"{COOCCURRENCE_PNG})", "", "| label | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label in report["classes"]:
        rare = " (rare)" if label in ml["rare"] else ""
        lines.append(f"| {label}{rare} | " + " | ".join(str(report["splits"][n]["per_class"][label])
                                                        for n in names) + " |")
    for n in names:
        spread = ml["splits"][n]["labels_per_image"]
        lines.append(f"- {n}: {ml['splits'][n]['no_label']} image(s) with no label; labels per image "
                     f"{spread.get('min', 0)}/{spread.get('median', 0)}/{spread.get('max', 0)} (min/median/max)")
    return lines + [""]


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


def write_audit(out_dir: str | Path, report: dict, max_pixels: int) -> list[Path]:
    """`audit.json` and, beside it, the sheets (`write_audit_sheets`); returns the sheets written."""
    write_json(Path(out_dir) / "audit.json", report)
    return write_audit_sheets(out_dir, report, max_pixels)


def write_audit_sheets(out_dir: str | Path, report: dict, max_pixels: int) -> list[Path]:
    """near_duplicates.png and label_issues.png in `out_dir`, each when the report has something to show."""
    written = []
    pairs = report.get("near_duplicates", {}).get("pairs")
    if pairs:
        written.append(write_image(Path(out_dir) / "near_duplicates.png", near_duplicate_sheet(pairs, max_pixels)))
    candidates = report.get("label_issues", {}).get("candidates")
    if candidates:
        written.append(write_image(Path(out_dir) / "label_issues.png", label_issue_sheet(candidates, max_pixels)))
    if report.get("multilabel"):
        written.append(plots.write_cooccurrence(Path(out_dir) / COOCCURRENCE_PNG,
                                                np.asarray(report["multilabel"]["co_occurrence"]), report["classes"]))
    return written
