"""CSV manifests: a dataset given as rows `path,label[,split]`, and the `split.csv` every run writes.

Input (`dataset.manifest=/path/file.csv`): a header row naming the columns `path` and `label` (and optionally
`split`, one of train/val/test per row); other columns are ignored. Relative paths are relative to the CSV's
folder, absolute ones are used as they are. Output (`split.csv` in the run dir): the same columns with
absolute paths, one row per image the run used, in the order the run used them, so that the file, given back
as `dataset.manifest`, reproduces the run's split exactly even after the run dir is moved.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from pipeline.errors import ConfigError, MissingFileError
from pipeline.runtime.files import write_csv

SPLIT_CSV = "split.csv"  # written to every run dir
COLUMNS = ("path", "label", "split")
SPLIT_VALUES = ("train", "val", "test")
_FORMAT = "a CSV whose first row names the columns path,label[,split]"


@dataclass
class ManifestRow:
    path: str  # absolute
    written: str  # as written in the CSV (hidden-folder checks look at these parts)
    label: str
    split: Optional[str]  # None: the manifest has no split column
    line: int  # line number in the CSV (the header is line 1)


def manifest_file(value: str) -> Path:
    """The CSV named by `dataset.manifest`, as an absolute path; a one-line error when it is not a file."""
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise MissingFileError(f"dataset.manifest={value} is not a file: point it at {_FORMAT} "
                               "(e.g. a run's split.csv)")
    return path


def _header(reader: csv.DictReader, where: str) -> dict[str, str]:
    """{column: name in the file}: names are matched without case and surrounding spaces."""
    names = {(n or "").strip().lower(): n for n in reader.fieldnames or []}
    for column in COLUMNS[:2]:
        if column not in names:
            raise ConfigError(f"{where} has no '{column}' column (header: {','.join(reader.fieldnames or [])}): "
                              f"make it {_FORMAT}")
    return names


def _row(raw: dict, names: dict[str, str], line: int, folder: Path, where: str) -> ManifestRow:
    written = (raw.get(names["path"]) or "").strip()
    label = (raw.get(names["label"]) or "").strip()
    split = (raw.get(names["split"]) or "").strip().lower() if "split" in names else None
    if not written or not label:
        raise ConfigError(f"{where} line {line}: empty {'path' if not written else 'label'}; give every row a "
                          "path and a class label, or remove the row")
    if split is not None and split not in SPLIT_VALUES:
        raise ConfigError(f"{where} line {line}: split '{split}' is not one of {', '.join(SPLIT_VALUES)}; fix the "
                          "value, or drop the split column to get a stratified split")
    return ManifestRow(os.path.normpath(folder / Path(written).expanduser()), written, label, split, line)


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


def read_manifest(value: str) -> list[ManifestRow]:
    """The rows of `dataset.manifest`, checked: columns, split values, every file present and listed once."""
    path = manifest_file(value)
    where = f"dataset.manifest {path}"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            names = _header(reader, where)
            rows = [_row(raw, names, reader.line_num, path.parent, where) for raw in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{where} is not a readable UTF-8 CSV ({type(e).__name__}); save it as {_FORMAT}") from None
    if not rows:
        raise ConfigError(f"{where} has no rows: add one row per image ({_FORMAT})")
    _check_files(rows, where, path.parent)
    return rows


def write_split_csv(path: str | Path, rows: Iterable[tuple[str, str, str]]) -> Path:
    """`split.csv`: (path, label, split) rows, paths made absolute."""
    return write_csv(path, ([os.path.abspath(p), label, split] for p, label, split in rows), header=COLUMNS)
