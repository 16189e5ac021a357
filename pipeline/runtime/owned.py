"""What the pipeline may delete or replace: only dirs it created and marked.

Every dir the pipeline makes to replace later (a generated dataset, an export, a run or sweep dir) carries a
`.pipeline-owned` file naming its kind. `check_replaceable` is the one gate before a dir is replaced: a dir
that is missing, empty or marked with the same kind may go; anything else is the user's, and the answer is a
one-line `OutputError` naming a file in it and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import OutputError

MARK = ".pipeline-owned"
KINDS = ("dataset", "export", "run", "sweep")


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
