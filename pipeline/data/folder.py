"""Data stage: list an ImageFolder tree, drop undecodable files, split, and serve samples."""
from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from pipeline.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, load_rgb, probe_image
from pipeline.errors import ConfigError, MissingFileError

_logger = logging.getLogger(__name__)



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
    files: dict[str, dict] = field(default_factory=dict)  # probe record (hash, format, mode, size) per listed file


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


def check_layout(root: Path, *, train_split: str, val_split: str, val_fraction: float,
                         min_per_class: int) -> None:
    """Before probing: every class has >= min_per_class image files, and a val split can be drawn from train."""
    train_dir = Path(root) / train_split
    classes = find_classes(train_dir)
    if len(classes) < 2:
        return  # folder.load_imagefolder reports it with the expected layout
    paths, labels, _ = list_split(train_dir, classes)
    counts = Counter(labels)
    need = max(1, min_per_class)
    small = {c: counts.get(i, 0) for i, c in enumerate(classes) if counts.get(i, 0) < need}
    if small:
        raise ConfigError(f"Classes with fewer than {need} train image file(s) in {train_dir}: {small}; add images, "
                          f"remove those folders{' or lower dataset.min_per_class' if need > 1 else ''}")
    if (Path(root) / val_split).is_dir():
        return
    n_val = max(int(round(val_fraction * len(paths))), len(classes))
    if len(paths) - n_val < len(classes):
        raise ConfigError(f"No {val_split}/ folder in {root} and only {len(paths)} train images for {len(classes)} "
                          f"classes: a val split of {n_val} (dataset.val_fraction={val_fraction}, at least one per "
                          f"class) would leave classes without train images; add {root}/{val_split}/<class>/<image> "
                          "or more train images")


def probe_files(paths: list[str], max_pixels: int, workers: int = 8) -> dict[str, dict]:
    """Read every file once (threads; decoders release the GIL): hash, header facts, draft decode.

    Returns {path: record} (see images.probe_image); a failed file's record has an "error".
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        records = list(pool.map(lambda p: probe_image(p, max_pixels=max_pixels), paths))
    return dict(zip(paths, records))


def check_decodable(paths: list[str], max_pixels: int, workers: int = 8) -> dict[str, str]:
    """{path: reason} of the files that do not decode."""
    return {p: r["error"] for p, r in probe_files(paths, max_pixels, workers).items() if "error" in r}


def load_split(split_dir: Path, classes: list[str], max_pixels: int,
               workers: int) -> tuple[Split, list[dict], dict[str, dict]]:
    """List one split, probe its files, and drop those that do not decode (returned as skipped)."""
    paths, labels, skipped = list_split(split_dir, classes)
    records = probe_files(paths, max_pixels, workers)
    skipped += [{"path": p, "reason": r["error"]} for p, r in records.items() if "error" in r]
    keep = [i for i, p in enumerate(paths) if "error" not in records[p]]
    return Split([paths[i] for i in keep], [labels[i] for i in keep], classes), skipped, records


def stratified_split(split: Split, val_fraction: float, seed: int,
                     groups: Optional[list] = None) -> tuple[Split, Split]:
    """Seeded stratified train/val split. A class with a single image (group) stays in train: it can still be
    learned, only val has no example of it (warned). Every other class has >= 2 images and is stratified.

    `groups` (e.g. content hashes): members of a group land on the same side, so identical files
    never leak from train into val. Without repeated groups the split equals the ungrouped one.
    """
    first: dict = {}
    rep_of = [first.setdefault(g, i) for i, g in enumerate(groups)] if groups else list(range(len(split)))
    reps = np.array(sorted(set(rep_of)))
    counts = Counter(split.labels[i] for i in reps)
    singles = sorted(c for c, n in counts.items() if n < 2)
    if singles:
        _logger.warning("Class(es) with a single train image kept in train, so val has no image of them: %s; add "
                        "images or a val/ folder", [split.classes[c] for c in singles])
    pool = np.array([r for r in reps if split.labels[r] not in singles])
    labels = [split.labels[i] for i in pool]
    n_classes = len(set(labels))
    n_val = max(int(round(val_fraction * len(reps))), n_classes)
    if len(pool) - n_val < n_classes:  # validate's file count passed, but duplicate files count once here
        raise ConfigError(f"Cannot split {n_val} val images off {len(reps)} distinct train images of {len(counts)} "
                          "classes and keep every class in train: add a val/ folder or more train images")
    _, va_reps = train_test_split(pool, test_size=n_val, random_state=seed, stratify=labels)
    in_val = set(va_reps.tolist())
    va = [i for i in range(len(split)) if rep_of[i] in in_val]
    tr = [i for i in range(len(split)) if rep_of[i] not in in_val]
    pick = lambda ids: Split([split.paths[i] for i in ids], [split.labels[i] for i in ids], split.classes)
    return pick(tr), pick(va)


def load_imagefolder(root: str | Path, *, train_split: str = "train", val_split: str = "val",
                     test_split: str = "test", val_fraction: float = 0.2, seed: int = 42,
                     max_pixels: int = DEFAULT_MAX_PIXELS, min_per_class: int = 1, workers: int = 8) -> DatasetSplits:
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
    train, skipped, files = load_split(train_dir, classes, max_pixels, workers)
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
            splits[name], more, records = load_split(root / name, classes, max_pixels, workers)
            skipped += more
            files.update(records)
    if val_split in splits:
        data = DatasetSplits(classes, train, splits[val_split], splits.get(test_split), "val", skipped, files)
    else:
        hashes = [files[p].get("sha1") or p for p in train.paths]  # identical files stay on one side
        tr, va = stratified_split(train, val_fraction, seed, groups=hashes)
        data = DatasetSplits(classes, tr, va, splits.get(test_split), f"stratified {val_fraction:.0%} of train",
                             skipped, files)
    if skipped:
        _logger.warning("Skipped %d file(s) that are not readable images (listed in the run report)", len(skipped))
    return data


class ImageDataset(torch.utils.data.Dataset):
    """Decodes one image per item (or takes it from a decoded-image cache) and applies an albumentations pipeline.

    A file that fails to decode mid-run yields None (dropped by `collate_skip_none`) instead of
    killing the epoch; when `skip_log` is set, the failure is appended to that JSON-lines file
    (one write per line, safe across DataLoader worker processes) so the run report can list it.
    """

    def __init__(self, split: Split, transform: Callable, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 cache: Optional[Callable[[str], np.ndarray]] = None, skip_log: Optional[str | Path] = None):
        self.split, self.transform, self.max_pixels = split, transform, max_pixels
        self.cache, self.skip_log = cache, (str(skip_log) if skip_log else None)

    def __len__(self) -> int:
        return len(self.split)

    def load(self, i: int) -> np.ndarray:
        path = self.split.paths[i]
        return self.cache(path) if self.cache is not None else load_rgb(path, max_pixels=self.max_pixels)

    def __getitem__(self, i: int):
        try:
            image = self.load(i)
            return self.transform(image=image)["image"], self.split.labels[i]
        except ImageDecodeError as e:  # a transform bug is not caught: it would fail on every image
            self._record_skip(self.split.paths[i], str(e))
            return None

    def _record_skip(self, path: str, reason: str) -> None:
        _logger.warning("Skipping unreadable image at run time: %s", reason)
        if self.skip_log:
            line = json.dumps({"path": path, "reason": reason}) + "\n"
            with open(self.skip_log, "a", encoding="utf-8") as f:
                f.write(line)


def read_skip_log(path: str | Path) -> list[dict]:
    """Files skipped at run time (unique paths, first reason, how many times) from an ImageDataset skip log."""
    path = Path(path)
    if not path.is_file():
        return []
    seen: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        seen.setdefault(entry["path"], {"path": entry["path"], "reason": f"at run time: {entry['reason']}", "times": 0})
        seen[entry["path"]]["times"] += 1
    return list(seen.values())


def collate_skip_none(batch):
    """default_collate over the samples that decoded; None when none of them did."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)
