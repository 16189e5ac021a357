"""Data stage: list an ImageFolder tree, drop undecodable files, split, and serve samples."""
from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from pipeline.errors import ConfigError, MissingFileError
from pipeline.images import ImageDecodeError, load_rgb

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class Split:
    """Samples of one split: image paths, integer labels and the class names they index."""
    paths: list[str]
    labels: list[int]
    classes: list[str]

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class DatasetSplits:
    classes: list[str]
    train: Split
    val: Split
    test: Optional[Split] = None
    val_source: str = "val"  # "val" folder, or "split of train"
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} for every dropped file


def find_classes(split_dir: Path) -> list[str]:
    """Sorted names of class folders (hidden folders ignored)."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_split(split_dir: Path, classes: list[str]) -> tuple[list[str], list[int], list[dict]]:
    """All files under `split_dir/<class>/`; non-image extensions are reported as skipped."""
    paths, labels, skipped = [], [], []
    for idx, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for p in sorted(class_dir.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append({"path": str(p), "reason": f"not an image extension ({p.suffix or 'none'})"})
                continue
            paths.append(str(p))
            labels.append(idx)
    return paths, labels, skipped


def check_decodable(paths: list[str], max_pixels: int, workers: int = 8) -> dict[str, str]:
    """Decode every file once (threads; decoders release the GIL). Returns {path: reason} of failures."""
    def probe(path: str) -> Optional[str]:
        try:
            load_rgb(path, max_pixels=max_pixels, draft_size=64)
            return None
        except ImageDecodeError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(probe, paths))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def load_split(split_dir: Path, classes: list[str], max_pixels: int, workers: int) -> tuple[Split, list[dict]]:
    paths, labels, skipped = list_split(split_dir, classes)
    bad = check_decodable(paths, max_pixels, workers)
    skipped += [{"path": p, "reason": r} for p, r in bad.items()]
    keep = [i for i, p in enumerate(paths) if p not in bad]
    return Split([paths[i] for i in keep], [labels[i] for i in keep], classes), skipped


def stratified_split(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded stratified train/val split; classes too small to stratify fall back to a plain split."""
    idx = np.arange(len(split))
    counts = Counter(split.labels)
    n_val = max(int(round(val_fraction * len(split))), len(counts))
    stratify = split.labels if min(counts.values()) >= 2 and n_val <= len(split) - len(counts) else None
    if stratify is None:
        _logger.warning("A class has fewer than 2 images: val split is random, not stratified.")
    tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=stratify)
    pick = lambda ids: Split([split.paths[i] for i in sorted(ids)], [split.labels[i] for i in sorted(ids)], split.classes)
    return pick(tr), pick(va)


def load_imagefolder(root: str | Path, *, train_split: str = "train", val_split: str = "val",
                     test_split: str = "test", val_fraction: float = 0.2, seed: int = 42,
                     max_pixels: int = 89_478_485, min_per_class: int = 1, workers: int = 8) -> DatasetSplits:
    """Read `root/train/<class>/*` (+ optional val/, test/), dropping files that do not decode."""
    root = Path(root)
    train_dir = root / train_split
    if not train_dir.is_dir():
        raise MissingFileError(f"No '{train_split}/' folder in dataset root {root}: expected "
                                f"{root}/{train_split}/<class>/<image> (set dataset.root=...)")
    classes = find_classes(train_dir)
    if len(classes) < 2:
        raise ConfigError(f"{train_dir} has {len(classes)} class folder(s); a classifier needs at least 2 "
                         f"(layout: {train_dir}/<class>/<image>)")
    train, skipped = load_split(train_dir, classes, max_pixels, workers)
    too_small = {c: n for c, n in train.counts().items() if n < max(1, min_per_class)}
    if too_small:
        raise ConfigError(f"Classes with fewer than {max(1, min_per_class)} readable train image(s) in {train_dir}: "
                         f"{too_small}; add images or remove those folders")
    splits = {}
    for name in (val_split, test_split):
        if (root / name).is_dir():
            extra = sorted(set(find_classes(root / name)) - set(classes))
            if extra:
                _logger.warning("%s/%s has classes not in train (ignored): %s", root, name, extra)
            splits[name], more = load_split(root / name, classes, max_pixels, workers)
            skipped += more
    if val_split in splits:
        data = DatasetSplits(classes, train, splits[val_split], splits.get(test_split), "val", skipped)
    else:
        tr, va = stratified_split(train, val_fraction, seed)
        data = DatasetSplits(classes, tr, va, splits.get(test_split), f"stratified {val_fraction:.0%} of train", skipped)
    if skipped:
        _logger.warning("Skipped %d file(s) that are not readable images (listed in the run report)", len(skipped))
    return data


class ImageDataset(torch.utils.data.Dataset):
    """Decodes one image per item and applies an albumentations pipeline.

    A file that fails to decode mid-run yields None (dropped by `collate_skip_none`)
    instead of killing the epoch.
    """

    def __init__(self, split: Split, transform: Callable, max_pixels: int = 89_478_485):
        self.split, self.transform, self.max_pixels = split, transform, max_pixels

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.split.paths[i], max_pixels=self.max_pixels)
        except ImageDecodeError as e:
            _logger.warning("Skipping unreadable image at run time: %s", e)
            return None
        return self.transform(image=image)["image"], self.split.labels[i]


def collate_skip_none(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)
