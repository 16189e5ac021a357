"""The one way the pipeline writes files: complete or not at all.

`write_atomic(path, write)` has `write` fill a temp file beside `path` (its name carries the process and
thread ids, so parallel sweep jobs, DataLoader workers and extraction threads never share one), fsyncs it,
renames it over `path` and fsyncs the directory. A crash or kill at any moment leaves the previous file or
the new one, never half of one; a failed write (disk full, unwritable dir) removes the temp file, leaves the
previous file intact and raises a one-line `FileWriteError` that names the file and the fix.
`staged_dir(path, kind=...)` does the same for a whole directory (an export, a generated dataset): it replaces
only a dir the pipeline made and marked (runtime/owned.py), and keeps the old dir until the new one is complete
and fsynced. Temp names carry the host and pid, so `clean_stale_temps` removes those of dead processes (a
kill -9 leaves them) at start-up and never another live process's.
The one exception is the run-time skip log (data/folder.py): an append-only JSON-lines file whose lines are
single `O_APPEND` writes.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pipeline.errors import OutputError
from pipeline.runtime import owned


class FileWriteError(OutputError):
    """A file could not be written (disk full, unwritable or vanished dir); the previous version is intact."""


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<tid>\d+)\.(?P<what>tmp|partial|old)$")


def _scratch(path: Path, what: str) -> Path:
    """A scratch name beside `path`, unique to this host, process and thread (`what`: tmp, partial or old)."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{threading.get_ident()}.{what}")


def temp_path(path: Path) -> Path:
    """A temp name beside `path`, unique to this process and thread."""
    return _scratch(Path(path), "tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(directory: str | Path) -> list[Path]:
    """Remove this host's temp files and staged dirs in `directory` whose process is dead; returns them.
    A left-over `.old` dir whose target is missing (a kill between the two renames of a replace) is put back."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _SCRATCH.match(entry.name)
        if not m or m["host"] != _HOST or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        target = entry.with_name(m["name"])
        try:
            if m["what"] == "old" and not target.exists():
                os.rename(entry, target)
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # another process cleaned it first, or it is not ours to remove: left as is
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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


def _nearly_full(directory: Path, margin: int = 4 << 20) -> bool:
    """Less than `margin` bytes free where `directory` lives: what a writer's own error (torch.save's
    "unexpected pos", a safetensors error) means when it comes without an errno."""
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def _hint(error: BaseException, full: bool = False) -> str:
    if full or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "no space left" in str(error).lower():
        return "the disk is full: free space or set output_dir=... on another disk"
    return "check that the dir exists and is writable, or set output_dir=..."


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` fills a temp file, which then replaces `path` atomically (see the module doc). The temp file
    is removed on any exception (Ctrl-C included); every failure to write is one `FileWriteError`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = _nearly_full(path.parent)  # before the temp file's space is given back
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the dir itself is gone or unwritable: nothing of ours is left behind to remove
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: cleaned up, passed on
            raise
        kept = "the previous version is intact" if path.exists() else "no previous version existed"
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise FileWriteError(f"Could not write {path} ({reason}); {kept}; {_hint(e, full)}") from e
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


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (OSError, AttributeError):
        return False


def _swap_in(new: Path, path: Path) -> None:
    """Put the complete dir `new` at `path`; an old `path` ends up at `new` (to delete), never lost on the way."""
    if not path.exists():
        os.rename(new, path)
    elif not _exchange(new, path):
        old = _scratch(path, "old")
        os.rename(path, old)  # a kill from here to the next rename: clean_stale_temps puts `old` back
        try:
            os.rename(new, path)
        except OSError:
            os.rename(old, path)
            raise
        os.rename(old, new)


@contextmanager
def staged_dir(path: str | Path, *, kind: str, fix: str, legacy_marks: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temp dir beside `path`; when the block succeeds it is marked `kind`, fsynced and swapped in
    for `path`, and only then is an older `path` removed. Otherwise it is deleted and `path` is left as it was.
    An existing `path` must be empty or a dir of `kind` the pipeline made (runtime/owned.py), else `fix` is the
    one-line error's advice."""
    path = Path(path)
    owned.check_replaceable(path, kind, fix, legacy_marks)
    clean_stale_temps(path.parent)
    tmp = _scratch(path, "partial")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise FileWriteError(f"Could not create {tmp} ({e.strerror or e}); {_hint(e)}") from None
    try:
        yield tmp
        try:
            owned.mark(tmp, kind)
            _fsync_tree(tmp)
            _swap_in(tmp, path)
        except OSError as e:
            raise FileWriteError(f"Could not write {path} ({e.strerror or e}); the previous version is intact; "
                                 f"{_hint(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the failed new dir, or the replaced old one
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
