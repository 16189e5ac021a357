"""What a dataset is made of, by name only (no file is read): its layout, classes, files per split, and the files
that are never trained on (hidden, in hidden folders, or not an image type).

Three layouts: `<root>/train/<class>/<image>` (+ optional val/, test/), a folder of class folders
`<root>/<class>/<image>` (no train/: every split is drawn from it), and a CSV manifest (`dataset.manifest`,
data/manifest.py) whose optional split column gives the splits.
"""
from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.data import manifest as manifest_csv
from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.errors import ConfigError, MissingFileError

_logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")  # the logical splits; dataset.*_split name their folders


@dataclass
class Listing:
    """A dataset by name only, before any file is read. Multi-label data (a manifest's `task`) labels each file
    with a tuple of class indices (possibly empty) instead of one index."""
    classes: list[str]
    splits: dict[str, tuple[list[str], list]]  # "train", and "val"/"test" where the data gives them
    skipped: list[dict]  # hidden files, files in hidden folders, unsupported extensions
    kind: str  # "train_folder" | "class_folders" | "manifest"
    where: str  # the dataset root or the manifest file
    multilabel: bool = False


def skip_reason(rel: Path) -> Optional[str]:
    """Why a file is not trained on, judged by its path below the class folder (or as a manifest writes it)."""
    hidden = next((part for part in rel.parts[:-1] if part.startswith(".")), None)
    if hidden:
        return f"in a hidden folder ({hidden})"
    if rel.name.startswith("."):
        return "hidden file"
    if rel.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"unsupported extension {rel.suffix}" if rel.suffix else "no file extension"
    return None


def find_classes(split_dir: Path) -> list[str]:
    """Sorted names of class folders (hidden folders ignored)."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _difference(a: str, b: str) -> str:
    """How two names with the same `check_distinct` key differ, in words (ascii() shows the code points)."""
    if unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b):
        return f"Unicode normal form ({ascii(a)} vs {ascii(b)}: the same letters, composed differently)"
    return "letter case" if a.casefold() == b.casefold() else "letter case and Unicode normal form"


def check_distinct(named: list[tuple[str, str]], what: str, fix: str) -> None:
    """`named`: (class name, how to show it). Two names that differ only in letter case or Unicode normal form
    (NFC/NFD) would be two classes that a person, or a case-insensitive file system, takes for one: a one-line
    ConfigError naming both, then `fix`."""
    seen: dict[str, tuple[str, str]] = {}
    for name, shown in named:
        first, first_shown = seen.setdefault(unicodedata.normalize("NFC", name).casefold(), (name, shown))
        if first != name:
            raise ConfigError(f"{what} {first_shown} and {shown} differ only in {_difference(first, name)}: "
                              f"one class spelled two ways; {fix}")


def _check_folders(folders: list[Path]) -> None:
    check_distinct([(p.name, str(p)) for p in folders], "Class folders",
                   "rename one, or move its images into the other and delete it")


def list_split(split_dir: Path, classes: list[str]) -> tuple[list[str], list[int], list[dict]]:
    """All files under `split_dir/<class>/`; hidden ones, those in hidden folders and non-image extensions are
    returned as skipped."""
    paths, labels, skipped = [], [], []
    for idx, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for p in sorted(class_dir.rglob("*")):
            if not p.is_file():
                continue
            reason = skip_reason(p.relative_to(class_dir))
            if reason:
                skipped.append({"path": str(p), "reason": reason})
                continue
            paths.append(str(p))
            labels.append(idx)
    return paths, labels, skipped


def _list_folders(root: Path, train_split: str, val_split: str, test_split: str) -> Listing:
    """`root/train/<class>/` (+ val/, test/), or, without train/, `root/<class>/`."""
    given = {"val": val_split, "test": test_split}
    train_dir = root / train_split
    if train_dir.is_dir():
        classes = find_classes(train_dir)
        split_dirs = [root / name for name in given.values() if (root / name).is_dir()]
        _check_folders([train_dir / c for c in classes] + [d / c for d in split_dirs for c in find_classes(d)])
        train_paths, train_labels, skipped = list_split(train_dir, classes)
        splits = {"train": (train_paths, train_labels)}
        for key, name in given.items():
            if (root / name).is_dir():
                extra = sorted(set(find_classes(root / name)) - set(classes))
                if extra:
                    _logger.warning("%s/%s has classes not in train (ignored): %s", root, name, extra)
                paths, labels, more = list_split(root / name, classes)
                splits[key] = (paths, labels)
                skipped += more
        return Listing(classes, splits, skipped, "train_folder", str(root))
    expected = f"expected {root}/<class>/<image> or {root}/{train_split}/<class>/<image>"
    present = [name for name in given.values() if (root / name).is_dir()]
    if present:
        raise MissingFileError(f"Dataset root {root} has {present[0]}/ but no {train_split}/ folder: {expected}")
    classes = find_classes(root) if root.is_dir() else []
    _check_folders([root / c for c in classes])
    paths, labels, skipped = list_split(root, classes)
    if not paths:
        raise MissingFileError(f"No '{train_split}/' folder and no class folders with images in dataset root {root}: "
                               f"{expected} (set dataset.root=..., or dataset.manifest=<csv>)")
    return Listing(classes, {"train": (paths, labels)}, skipped, "class_folders", str(root))


def _list_manifest(value: str, label_delim: str, task: str) -> Listing:
    """The rows of a CSV manifest; the classes are the labels of its train rows (every row without a split column).
    Multi-label rows keep the labels among those classes (a val/test label not in train is dropped, warned)."""
    rows, task = manifest_csv.read_manifest(value, delim=label_delim, task=task)
    where = str(manifest_csv.manifest_file(value))
    check_distinct([(label, f"'{label}' (line {r.line})") for r in rows for label in r.labels],
                   f"dataset.manifest {where}: labels", "use one spelling of the label in every row")
    classes = sorted({label for r in rows if r.split in (None, "train") for label in r.labels})
    if not classes:
        raise ConfigError(f"dataset.manifest {where} has no train rows: mark rows split=train, or drop the split "
                          "column to get a stratified split")
    extra = sorted({label for r in rows for label in r.labels} - set(classes))
    if extra:
        _logger.warning("dataset.manifest %s: labels of val/test rows not in train (ignored): %s", where, extra)
    index, splits, skipped, multilabel = {c: i for i, c in enumerate(classes)}, {}, [], task == "multilabel"
    for r in rows:
        written = Path(r.written)
        reason = skip_reason(Path(written.name) if written.is_absolute() else written)
        if reason:
            skipped.append({"path": r.path, "reason": reason})
        elif multilabel or r.label in index:
            paths, labels = splits.setdefault(r.split or "train", ([], []))
            paths.append(r.path)
            labels.append(tuple(index[x] for x in r.labels if x in index) if multilabel else index[r.label])
    splits.setdefault("train", ([], []))
    return Listing(classes, {k: splits[k] for k in SPLITS if k in splits}, skipped, "manifest", where, multilabel)


def list_source(root: str | Path, *, train_split: str = "train", val_split: str = "val", test_split: str = "test",
                manifest: Optional[str] = None, label_delim: str = "|", task: str = "auto") -> Listing:
    """The dataset's files and labels by name: `dataset.manifest` when set, else the folder tree at `root` (folder
    layouts are single-label: `dataset.task=multilabel` needs a manifest)."""
    if manifest:
        return _list_manifest(manifest, label_delim, task)
    if task == "multilabel":
        raise ConfigError(f"dataset.task=multilabel needs a CSV manifest (dataset.manifest=<csv> with a labels "
                          f"column, e.g. cat|dog); the folder layout at {root} gives one class per image")
    return _list_folders(Path(root), train_split, val_split, test_split)


def layout_text(listing: Listing) -> str:
    """Where the images and labels come from, in words (run summary)."""
    return {"train_folder": f"ImageFolder tree {listing.where}/<split>/<class>/<image>",
            "class_folders": f"class folders {listing.where}/<class>/<image> (no train/ folder)",
            "manifest": f"CSV manifest {listing.where}"}[listing.kind]


def split_plan(given: set[str], val_fraction: float, test_fraction: float) -> list[tuple[str, float]]:
    """The splits to draw from train, in order, each with its share of what is left by then."""
    plan = [("test", test_fraction)] if "test" not in given and test_fraction > 0 else []
    if "val" not in given:
        taken = sum(f for _, f in plan)
        if taken + val_fraction >= 1:
            raise ConfigError(f"dataset.val_fraction={val_fraction} + dataset.test_fraction={test_fraction} leave "
                              "no train images: keep their sum below 1")
        plan.append(("val", val_fraction / (1 - taken)))
    return plan

