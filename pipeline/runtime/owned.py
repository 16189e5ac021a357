"""What the pipeline may delete or replace: only dirs it created and marked.

Every dir the pipeline makes to replace later (a generated dataset, an export, a run or sweep dir) carries a
`.pipeline-owned` file naming its kind. `check_replaceable` is the one gate before a dir is replaced: a dir
that is missing, empty or marked with the same kind may go; anything else is the user's, and the answer is a
one-line `OutputError` naming a file in it and the fix. Commands that write into a dir (audit, report, rank)
take it through `prepare_output_dir`, and those that write one file (preview, predict's CSV) through
`prepare_output_file`: a file of the user's is never overwritten.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import OutputError

MARK = ".pipeline-owned"
KINDS = ("dataset", "export", "run", "sweep", "audit", "report", "rank", "files")
HYDRA_FILES = (".hydra",)  # with `*.log`: what Hydra puts in a dir before the command runs


def mark(directory: str | Path, kind: str) -> Path:
    """Mark `directory` (existing) as made by the pipeline, of `kind`; an existing mark is kept."""
    if kind not in KINDS:
        raise ValueError(f"unknown owned kind {kind!r}; one of {KINDS}")
    path = Path(directory) / MARK
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"kind": kind, "by": "pipeline"}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def owner(directory: str | Path) -> str | None:
    """The kind `directory` is marked with, or None (no mark, unreadable mark)."""
    try:
        kind = json.loads((Path(directory) / MARK).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


def _first_entry(directory: Path) -> Path | None:
    try:
        return next(iter(sorted(directory.iterdir())), None)
    except OSError:
        return None


def check_replaceable(path: str | Path, kind: str, fix: str, legacy_marks: tuple[str, ...] = ()) -> None:
    """Raise unless `path` may be replaced by a new dir of `kind`: missing, empty, or marked `kind` (or holding
    one of `legacy_marks`, the completion files older versions wrote). `fix` says what to do instead."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"{path} exists and is not a dir the pipeline made: {fix}")
    first = _first_entry(path)
    if first is None or owner(path) == kind or any((path / m).is_file() for m in legacy_marks):
        return
    raise OutputError(f"{path} holds files the pipeline did not write (e.g. {first.name}) and would be replaced: "
                      f"{fix}")


def _foreign(directory: Path) -> list[str]:
    """Entries that neither Hydra (its log, `.hydra/`) nor the pipeline's mark account for."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name != MARK and p.name not in HYDRA_FILES and not p.name.endswith(".log"))


def prepare_output_dir(path: str | Path, kind: str, fix: str, also: tuple[str, ...] = ()) -> Path:
    """Create `path` (marked `kind`) for a command's output files, or accept it when it is new, holds only
    Hydra's files, or is marked `kind` (or one of `also`); a dir of the user's is a one-line error."""
    path = Path(path).expanduser()
    if path.is_dir() and owner(path) not in (kind, *also):
        foreign = _foreign(path)
        if foreign:
            raise OutputError(f"{path} holds files the pipeline did not write (e.g. {foreign[0]}), which its output "
                              f"could overwrite: {fix}")
    elif path.exists() and not path.is_dir():
        raise OutputError(f"{path} exists and is not a dir: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot create {path} ({e.strerror or e}): {fix}") from None
    if owner(path) is None:
        mark(path, kind)
    return path


def prepare_output_file(path: str | Path, fix: str) -> Path:
    """Check that writing `path` overwrites nothing of the user's: a new file, or one in a dir the pipeline
    made (e.g. outputs/preview/, marked when created). A new parent dir is created and marked."""
    path = Path(path).expanduser()
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"Cannot create {parent} ({e.strerror or e}): {fix}") from None
        mark(parent, "files")
    if (path.exists() or path.is_symlink()) and owner(parent) is None:
        raise OutputError(f"{path} already exists and the pipeline did not write it: {fix}")
    return path
