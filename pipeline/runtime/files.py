"""The one way the pipeline writes files: complete or not at all.

`write_atomic(path, write)` has `write` fill a temp file beside `path` (its name carries the process and
thread ids, so parallel sweep jobs, DataLoader workers and extraction threads never share one), fsyncs it,
renames it over `path` and fsyncs the directory. A crash or kill at any moment leaves the previous file or
the new one, never half of one; a failed write (disk full, unwritable dir) removes the temp file, leaves the
previous file intact and raises a one-line `FileWriteError` that names the file and the fix.
`staged_dir(path)` does the same for a whole directory (an export, a generated dataset).
The one exception is the run-time skip log (data/folder.py): an append-only JSON-lines file whose lines are
single `O_APPEND` writes.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pipeline.errors import OutputError


class FileWriteError(OutputError):
    """A file could not be written (disk full, unwritable or vanished dir); the previous version is intact."""


def temp_path(path: Path) -> Path:
    """A temp name beside `path`, unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory: the rename itself is still atomic
    finally:
        os.close(fd)


def _hint(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space or set output_dir=... on another disk"
    return "check that the dir exists and is writable, or set output_dir=..."


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` fills a temp file, which then replaces `path` atomically (see the module doc)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the previous version is intact" if path.exists() else "no previous version existed"
        raise FileWriteError(f"Could not write {path} ({e.strerror or e}); {kept}; {_hint(e)}") from None
    _fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Indented JSON; values JSON does not know (paths, numpy scalars) are written as strings."""
    return write_text(path, json.dumps(obj, indent=2, default=str))


def write_csv(path: str | Path, rows: Iterable[Sequence], header: Sequence[str] | None = None) -> Path:
    """CSV rows (lists), with an optional header row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return write_atomic(path, lambda p: p.write_text(buffer.getvalue(), encoding="utf-8", newline=""))


def write_figure(path: str | Path, figure, **savefig_kwargs) -> Path:
    """A matplotlib figure, in the format of `path`'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return write_atomic(path, lambda p: figure.savefig(p, format=fmt, **savefig_kwargs))


def write_image(path: str | Path, image) -> Path:
    """A PIL image, in the format of `path`'s suffix."""
    fmt = {"jpg": "JPEG"}.get(Path(path).suffix.lstrip(".").lower(), Path(path).suffix.lstrip(".").upper())
    return write_atomic(path, lambda p: image.save(p, format=fmt or "PNG"))


@contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp dir beside `path`; when the block succeeds it replaces `path` (an older `path` is
    removed first), otherwise it is deleted and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise FileWriteError(f"Could not create {tmp} ({e.strerror or e}); {_hint(e)}") from None
    try:
        yield tmp
        try:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except OSError as e:
            raise FileWriteError(f"Could not write {path} ({e.strerror or e}); {_hint(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(path.parent)


def ensure_writable_dir(path: Path) -> Path:
    """Create the run dir and prove it is writable, before any work whose results would be lost."""
    probe = Path(path) / f".write_test.{os.getpid()}"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"Output dir {path} is not writable ({e.strerror or e}): set output_dir=... to a writable "
                          "dir, or fix its permissions / free disk space") from None
    return Path(path)
