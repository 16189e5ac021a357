"""CSV manifests: a dataset given as rows `path,label[,split]`, and the `split.csv` every run writes.

Input (`dataset.manifest=/path/file.csv`): a header row naming the columns `path` and `label` (or `labels`; and
optionally `split`, one of train/val/test per row); other columns are ignored. Relative paths are relative to the
CSV's folder, absolute ones are used as they are. Multi-label data: a label cell may hold several labels separated
by `dataset.label_delim` (`|`), e.g. `cat|dog`, and may then be empty (an image with none of the labels). The task
(`dataset.task`) is `multilabel` when set so or, with `auto`, when any row holds more than one label; else `single`.
Output (`split.csv` in the run dir): the same columns with absolute paths (a multi-label row's labels joined by the
delimiter), one row per image the run used, in the order the run used them, so that the file, given back as
`dataset.manifest`, reproduces the run's split exactly even after the run dir is moved.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from pipeline.config.schema import TASKS
from pipeline.errors import ConfigError, MissingFileError
from pipeline.runtime.files import write_csv

SPLIT_CSV = "split.csv"  # written to every run dir
COLUMNS = ("path", "label", "split")
SPLIT_VALUES = ("train", "val", "test")
LABEL_COLUMNS = ("label", "labels")
_FORMAT = "a CSV whose first row names the columns path,label[,split]"


@dataclass
class ManifestRow:
    path: str  # absolute
    written: str  # as written in the CSV (hidden-folder checks look at these parts)
    label: str  # the cell as written (stripped)
    split: Optional[str]  # None: the manifest has no split column
    line: int  # line number in the CSV (the header is line 1)
    labels: tuple[str, ...] = ()  # the cell split at dataset.label_delim: sorted, unique, none empty


def manifest_file(value: str) -> Path:
    """The CSV named by `dataset.manifest`, as an absolute path; a one-line error when it is not a file."""
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise MissingFileError(f"dataset.manifest={value} is not a file: point it at {_FORMAT} "
                               "(e.g. a run's split.csv)")
    return path


def _header(reader: csv.DictReader, where: str) -> dict[str, str]:
    """{column: name in the file}: names are matched without case and surrounding spaces; `labels` stands for
    `label`."""
    names = {(n or "").strip().lower(): n for n in reader.fieldnames or []}
    given = [c for c in LABEL_COLUMNS if c in names]
    if len(given) > 1:
        raise ConfigError(f"{where} has both a 'label' and a 'labels' column: keep one")
    if given:
        names["label"] = names[given[0]]
    for column in COLUMNS[:2]:
        if column not in names:
            raise ConfigError(f"{where} has no '{column}' column (header: {','.join(reader.fieldnames or [])}): "
                              f"make it {_FORMAT}")
    return names


def _row(raw: dict, names: dict[str, str], line: int, folder: Path, where: str, delim: str) -> ManifestRow:
    written = (raw.get(names["path"]) or "").strip()
    label = (raw.get(names["label"]) or "").strip()
    split = (raw.get(names["split"]) or "").strip().lower() if "split" in names else None
    if not written:
        raise ConfigError(f"{where} line {line}: empty path; give every row a path and a class label, or remove "
                          "the row")
    if split is not None and split not in SPLIT_VALUES:
        raise ConfigError(f"{where} line {line}: split '{split}' is not one of {', '.join(SPLIT_VALUES)}; fix the "
                          "value, or drop the split column to get a stratified split")
    labels = tuple(sorted({part.strip() for part in label.split(delim) if part.strip()})) if delim else (label,)
    return ManifestRow(os.path.normpath(folder / Path(written).expanduser()), written, label, split, line,
                       labels if label else ())


def resolve_task(rows: list[ManifestRow], task: str, where: str) -> str:
    """`single` or `multilabel` (module doc); a single-label manifest must give every row one label."""
    if task not in TASKS:
        raise ConfigError(f"dataset.task={task} is not one of {', '.join(TASKS)}")
    several = next((r for r in rows if len(r.labels) > 1), None)
    if task == "auto":
        task = "multilabel" if several else "single"
    if task == "single":
        bad = several or next((r for r in rows if not r.labels), None)
        if bad is not None:
            what = "empty label" if not bad.labels else f"{len(bad.labels)} labels ({bad.label})"
            raise ConfigError(f"{where} line {bad.line}: {what} in a single-label manifest; give every row one "
                              "class label, or set dataset.task=multilabel (dataset.label_delim='' reads a cell "
                              "as one class name)")
    return task


def _check_files(rows: list[ManifestRow], where: str, folder: Path) -> None:
    """Every row names an existing file, once."""
    missing = [r for r in rows if not os.path.isfile(r.path)]
    if missing:
        more = f" (and {len(missing) - 1} more row(s))" if len(missing) > 1 else ""
        raise MissingFileError(f"{where} line {missing[0].line}: {missing[0].path} is not a file{more}; relative "
                               f"paths are relative to {folder}: fix the path or remove the row")
    first: dict[str, int] = {}
    for r in rows:
        if first.setdefault(r.path, r.line) != r.line:
            raise ConfigError(f"{where} line {r.line}: {r.written} is listed again (first on line "
                              f"{first[r.path]}); keep one row per file")


def read_manifest(value: str, *, delim: str = "|", task: str = "single") -> tuple[list[ManifestRow], str]:
    """(the rows of `dataset.manifest`, the resolved task), checked: columns, split values, labels for the task,
    every file present and listed once. `delim`: dataset.label_delim ("" = a cell is one label)."""
    path = manifest_file(value)
    where = f"dataset.manifest {path}"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            names = _header(reader, where)
            rows = [_row(raw, names, reader.line_num, path.parent, where, delim) for raw in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{where} is not a readable UTF-8 CSV ({type(e).__name__}); save it as {_FORMAT}") from None
    if not rows:
        raise ConfigError(f"{where} has no rows: add one row per image ({_FORMAT})")
    task = resolve_task(rows, task, where)
    _check_files(rows, where, path.parent)
    return rows, task


def write_split_csv(path: str | Path, rows: Iterable[tuple[str, str, str]]) -> Path:
    """`split.csv`: (path, label, split) rows, paths made absolute."""
    return write_csv(path, ([os.path.abspath(p), label, split] for p, label, split in rows), header=COLUMNS)
