"""Data stage: list a dataset (an ImageFolder tree, a folder of class folders, or a CSV manifest), drop the
files that are not usable images, draw the splits the data does not give, and serve samples."""
from __future__ import annotations

import json
import logging
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from pipeline.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, check_decodable_image, load_rgb
from pipeline.data.listing import (
    SPLITS,
    Listing,
    find_classes,  # noqa: F401 (callers know it as folder.find_classes)
    layout_text,
    list_source,
    list_split,  # noqa: F401 (callers know it as folder.list_split)
    split_plan,
)
from pipeline.errors import ConfigError
from pipeline.runtime.seeding import seed_transform

_logger = logging.getLogger(__name__)


@dataclass
class Split:
    """Samples of one split: image paths, labels and the class names they index. A label is an int (one class per
    image), or for multi-label data (`multilabel`) a tuple of class indices, possibly empty."""
    paths: list[str]
    labels: list
    classes: list[str]
    multilabel: bool = False

    def counts(self) -> dict[str, int]:
        """Images per class (multi-label: images carrying the label)."""
        c = Counter(i for y in self.labels for i in y) if self.multilabel else Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    def label_names(self, label) -> list[str]:
        """The class names of one sample's label."""
        return [self.classes[i] for i in label] if self.multilabel else [self.classes[label]]

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, indices) -> "Split":
        """The split of the samples at `indices`, in that order."""
        return Split([self.paths[i] for i in indices], [self.labels[i] for i in indices], self.classes,
                     self.multilabel)

    def sample(self, n: int, seed: int) -> "Split":
        """A seeded sample of `n` files (all of them when fewer), in the split's order."""
        if len(self) <= n:
            return self
        return self.take(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))


@dataclass
class DatasetSplits:
    classes: list[str]
    train: Split
    val: Split
    test: Optional[Split] = None
    val_source: str = "val"  # "val" folder, "manifest split column", or "stratified 20% of train"
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} for every dropped file
    files: dict[str, dict] = field(default_factory=dict)  # probe record (hash, format, mode, size) per listed file
    layout: str = ""  # where the images and labels came from, in words
    test_source: str = ""  # as val_source; "" without a test split
    kind: str = "train_folder"  # listing.Listing.kind: train_folder | class_folders | manifest
    leaked: dict[str, Split] = field(default_factory=dict)  # val/test copies of earlier files (data/leaks.py)
    label_delim: str = "|"  # joins a multi-label sample's class names in split.csv

    @property
    def multilabel(self) -> bool:
        return self.train.multilabel

    def rows(self) -> Iterator[tuple[str, str, str]]:
        """(path, class name(s), split) of every image used: the rows of the run's split.csv."""
        for name in SPLITS:
            for split in (getattr(self, name), self.leaked.get(name)):
                if split is not None:
                    yield from ((p, self.label_delim.join(split.label_names(y)), name)
                                for p, y in zip(split.paths, split.labels))


def _too_few(listing: Listing, held: dict[str, int], n: int, fractions: dict[str, float], names: dict) -> str:
    """The message for splits that cannot be drawn without emptying a train class."""
    first = "val" if "val" in held else "test"
    lead, fix = {
        "train_folder": (f"No {names[first]}/ folder in {listing.where}",
                         f"add {listing.where}/{names[first]}/<class>/<image> or more train images"),
        "class_folders": (f"Class folders in {listing.where}", "add images or lower the fractions"),
        "manifest": (f"dataset.manifest {listing.where}", f"add rows with split={first}, or more train rows"),
    }[listing.kind]
    what = " and ".join(f"{k} {name}" for name, k in held.items())
    keys = ", ".join(f"dataset.{name}_fraction={fractions[name]}" for name in held)
    return (f"{lead} and only {n} train images for {len(listing.classes)} classes: holding out {what} images "
            f"({keys}, at least one per class each) would leave classes without train images; {fix}")


@dataclass(frozen=True)
class SplitLayout:
    """Where the splits come from: folder names (or a manifest CSV) and the fractions drawn where none is given."""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    manifest: Optional[str] = None
    label_delim: str = "|"  # a manifest's multi-label cells (data/manifest.py)
    task: str = "auto"  # auto | single | multilabel

    @classmethod
    def from_group(cls, dataset) -> "SplitLayout":
        """The layout keys of a `dataset` config group (DatasetConfig node or dict)."""
        return cls(**{f.name: dataset[f.name] for f in fields(cls) if f.name in dataset})

    def listing(self, root: str | Path) -> Listing:
        return list_source(root, train_split=self.train_split, val_split=self.val_split,
                           test_split=self.test_split, manifest=self.manifest, label_delim=self.label_delim,
                           task=self.task)


def check_layout(root: Path, layout: SplitLayout, *, min_per_class: int) -> None:
    """Before probing: every class has >= min_per_class image files, and the splits to draw leave some in train."""
    listing = layout.listing(root)
    classes = listing.classes
    if len(classes) < (1 if listing.multilabel else 2):
        return  # load_imagefolder reports it with the expected layout
    paths, labels = listing.splits["train"]
    counts = Counter(i for y in labels for i in y) if listing.multilabel else Counter(labels)
    need = max(1, min_per_class)
    small = {c: counts.get(i, 0) for i, c in enumerate(classes) if counts.get(i, 0) < need}
    if small:
        raise ConfigError(f"Classes with fewer than {need} train image file(s) in {listing.where}: {small}; add "
                          f"images, remove those {'rows' if layout.manifest else 'folders'}"
                          f"{' or lower dataset.min_per_class' if need > 1 else ''}")
    left, held = len(paths), {}
    for name, share in split_plan(set(listing.splits), layout.val_fraction, layout.test_fraction):
        held[name] = max(int(round(share * left)), len(classes))
        left -= held[name]
    if held and left < len(classes):
        raise ConfigError(_too_few(listing, held, len(paths),
                                   {"val": layout.val_fraction, "test": layout.test_fraction},
                                   {"val": layout.val_split, "test": layout.test_split}))


def map_interruptible(fn: Callable, items: list, workers: int) -> list:
    """`[fn(x) for x in items]` on `workers` threads, at most 8 x workers queued ahead (the queue stays small
    however many files there are; one slow file does not stall the other threads). Ctrl-C, or an error, cancels
    what is queued and returns once the calls in progress (one per thread) end, not after the whole list."""
    workers = max(1, workers)
    pool = ThreadPoolExecutor(max_workers=workers)
    results, pending = [], deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 8 * workers:
                results.append(pending.popleft().result())
        while pending:
            results.append(pending.popleft().result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def check_decodable_files(paths: list[str], max_pixels: int, workers: int = 8) -> dict[str, dict]:
    """Read every file once (threads; decoders release the GIL): hash, header facts, draft decode.

    Returns {path: record} (see images.check_decodable_image); a failed file's record has an "error".
    """
    records = map_interruptible(lambda p: check_decodable_image(p, max_pixels=max_pixels), paths, workers)
    return dict(zip(paths, records))


def check_decodable(paths: list[str], max_pixels: int, workers: int = 8) -> dict[str, str]:
    """{path: reason} of the files that do not decode."""
    return {p: r["error"] for p, r in check_decodable_files(paths, max_pixels, workers).items() if "error" in r}


def check_decodable_split(paths: list[str], labels: list, classes: list[str], max_pixels: int,
                          workers: int, multilabel: bool = False) -> tuple[Split, list[dict], dict[str, dict]]:
    """Probe one split's files and drop those that are not usable images (returned as skipped)."""
    records = check_decodable_files(paths, max_pixels, workers)
    skipped = [{"path": p, "reason": r["error"]} for p, r in records.items() if "error" in r]
    keep = [i for i, p in enumerate(paths) if "error" not in records[p]]
    return Split(paths, labels, classes, multilabel).take(keep), skipped, records


def stratified_split(split: Split, val_fraction: float, seed: int, groups: Optional[list] = None,
                     name: str = "val") -> tuple[Split, Split]:
    """Seeded stratified split of `split` into (rest, `name`). A class with a single image (group) stays in the rest:
    it can still be learned, only `name` has no example of it (warned). Every other class is stratified.

    `groups` (e.g. content hashes): members of a group land on the same side, so identical files
    never leak from train into val. Without repeated groups the split equals the ungrouped one.
    """
    first: dict = {}
    rep_of = [first.setdefault(g, i) for i, g in enumerate(groups)] if groups else list(range(len(split)))
    reps = np.array(sorted(set(rep_of)))
    if split.multilabel:
        return multilabel_split(split, val_fraction, seed, rep_of, reps, name)
    counts = Counter(split.labels[i] for i in reps)
    singles = sorted(c for c, n in counts.items() if n < 2)
    if singles:
        _logger.warning("Class(es) with a single train image kept in train, so %s has no image of them: %s; add "
                        "images or a %s/ folder", name, [split.classes[c] for c in singles], name)
    pool = np.array([r for r in reps if split.labels[r] not in singles])
    labels = [split.labels[i] for i in pool]
    n_classes = len(set(labels))
    n_held = max(int(round(val_fraction * len(reps))), n_classes)
    if len(pool) - n_held < n_classes:  # check_layout's file count passed, but duplicate files count once here
        raise ConfigError(f"Cannot split {n_held} {name} images off {len(reps)} distinct train images of {len(counts)} "
                          f"classes and keep every class in train: add a {name}/ folder or more train images")
    _, held_reps = train_test_split(pool, test_size=n_held, random_state=seed, stratify=labels)
    held = set(held_reps.tolist())
    return (split.take([i for i in range(len(split)) if rep_of[i] not in held]),
            split.take([i for i in range(len(split)) if rep_of[i] in held]))


def multilabel_split(split: Split, fraction: float, seed: int, rep_of: list[int], reps: np.ndarray,
                     name: str) -> tuple[Split, Split]:
    """`stratified_split` for multi-label data: iterative stratification (Sechidis et al. 2011, the
    iterative-stratification package) over the distinct files `reps`, so that each label's share on both sides
    follows `fraction` as closely as the counts allow and rare labels reach both sides."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    n_held = max(1, int(round(fraction * len(reps))))
    if len(reps) - n_held < 1:
        raise ConfigError(f"Cannot split {n_held} {name} images off {len(reps)} distinct train images: add a {name} "
                          "split column or more train rows")
    targets = np.zeros((len(reps), len(split.classes)), dtype=np.int64)
    for row, i in enumerate(reps):
        targets[row, list(split.labels[i])] = 1
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_held, random_state=seed)
    _, held_rows = next(splitter.split(np.zeros((len(reps), 1)), targets))
    held = set(reps[held_rows].tolist())
    single = [split.classes[c] for c in np.flatnonzero(targets.sum(0) == 1)]
    if single:
        _logger.warning("Label(s) on a single train image: only one side of the %s split has them: %s", name, single)
    return (split.take([i for i in range(len(split)) if rep_of[i] not in held]),
            split.take([i for i in range(len(split)) if rep_of[i] in held]))


def load_imagefolder(root: str | Path, layout: SplitLayout = SplitLayout(), *, seed: int = 42,
                     max_pixels: int = DEFAULT_MAX_PIXELS, min_per_class: int = 1, workers: int = 8) -> DatasetSplits:
    """Read a dataset (`list_source`: train/ tree, class folders or manifest), drop files that are not usable
    images, and draw the val (and, with test_fraction > 0, test) split the data does not give, stratified."""
    listing = layout.listing(root)
    classes = listing.classes
    if len(classes) < 2 and not listing.multilabel:  # multi-label: one label is a yes/no classifier
        raise ConfigError(f"{listing.where} has {len(classes)} class(es); a classifier needs at least 2 "
                          f"(layout: {layout_text(listing)})")
    skipped, files, loaded = list(listing.skipped), {}, {}
    for name, (paths, labels) in listing.splits.items():
        loaded[name], more, records = check_decodable_split(paths, labels, classes, max_pixels, workers,
                                                            listing.multilabel)
        skipped += more
        files.update(records)
    too_small = {c: n for c, n in loaded["train"].counts().items() if n < max(1, min_per_class)}
    if too_small:
        raise ConfigError(f"Classes with fewer than {max(1, min_per_class)} readable train image(s) in "
                          f"{listing.where}: {too_small}; add images or remove those "
                          f"{'rows' if layout.manifest else 'folders'}")
    given = {"train_folder": {"val": layout.val_split, "test": layout.test_split}}.get(listing.kind, {})
    sources = {name: given.get(name, "manifest split column") for name in loaded if name != "train"}
    pool = "train" if listing.kind == "train_folder" or len(listing.splits) > 1 else "all images"
    for name, share in split_plan(set(loaded), layout.val_fraction, layout.test_fraction):
        hashes = [files[p].get("sha1") or p for p in loaded["train"].paths]  # identical files stay on one side
        loaded["train"], loaded[name] = stratified_split(loaded["train"], share, seed, groups=hashes, name=name)
        how = "iteratively stratified" if listing.multilabel else "stratified"
        sources[name] = f"{how} {layout.val_fraction if name == 'val' else layout.test_fraction:.0%} of {pool}"
    if skipped:
        _logger.warning("Skipped %d file(s) that are not readable images (listed in the run report)", len(skipped))
    return DatasetSplits(classes, loaded["train"], loaded["val"], loaded.get("test"), sources["val"], skipped, files,
                         layout_text(listing), sources.get("test", ""), listing.kind, label_delim=layout.label_delim)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes one image per item (or takes it from a decoded-image cache) and applies an albumentations pipeline.

    A file that fails to decode mid-run yields None (dropped by `collate_skip_none`) instead of
    killing the epoch; when `skip_log` is set, the failure is appended to that JSON-lines file
    (one write per line, safe across DataLoader worker processes) so the run report can list it.
    """

    def __init__(self, split: Split, transform: Callable, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 cache: Optional[Callable[[str], np.ndarray]] = None, skip_log: Optional[str | Path] = None,
                 targets: Optional[np.ndarray] = None):
        self.split, self.transform, self.max_pixels = split, transform, max_pixels
        self.cache, self.skip_log = cache, (str(skip_log) if skip_log else None)
        self.targets = targets  # one row per sample given in place of its label (training/distill.py)

    def __len__(self) -> int:
        return len(self.split)

    def load(self, i: int) -> np.ndarray:
        path = self.split.paths[i]
        return self.cache(path) if self.cache is not None else load_rgb(path, max_pixels=self.max_pixels)

    def __getitem__(self, item: int | tuple[int, int]):
        """`item`: an index, or (index, augmentation seed) from sampler.SeededSampler."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            seed_transform(self.transform, seed)
        try:
            image = self.load(i)
            target = self.split.labels[i] if self.targets is None else self.targets[i]
            return self.transform(image=image)["image"], target
        except ImageDecodeError as e:  # a transform bug is not caught: it would fail on every image
            record_skip(self.skip_log, self.split.paths[i], e.reason)
            return None


def record_skip(skip_log: Optional[str | Path], path: str, reason: str) -> None:
    """Log a file that failed at run time and append it to `skip_log` (one JSON line, one write: safe across
    DataLoader worker processes), so the run report can list it."""
    _logger.warning("Skipping unreadable image at run time: %s: %s", path, reason)
    if skip_log:
        line = json.dumps({"path": path, "reason": reason}) + "\n"
        with open(skip_log, "a", encoding="utf-8") as f:
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


def collate_skip_none(batch, channels_last: bool = False):
    """default_collate over the samples that decoded; None when none of them did.

    `channels_last` (trainer.channels_last): the images are stacked as NHWC memory and returned as an NCHW view in
    torch.channels_last, which the model takes as it is. albumentations' CHW tensors are views of HWC arrays, so
    this stack is a plain copy, where an NCHW stack and the main process's conversion each transpose (8 + 6 ms a
    batch of 32 at 224 px, the second on the train step's critical path)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    if channels_last and batch[0][0].dim() == 3:
        images = torch.utils.data.default_collate([b[0].permute(1, 2, 0) for b in batch]).permute(0, 3, 1, 2)
        return [images, torch.utils.data.default_collate([b[1] for b in batch])]
    return torch.utils.data.default_collate(batch)
