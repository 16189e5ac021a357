"""One run per dir: a live run holds an fcntl lock on its dir, and a fresh run refuses a dir that holds a run.

`claim(run_dir, resume=...)` is called once a run knows its dir (rank 0 alone under torchrun). It takes a
non-blocking `flock` on `<run dir>/.run.lock` (the kernel drops it when the process ends, kill -9 included),
so two processes never train in one dir; a fresh run (not `trainer.resume`) also refuses a dir that already
holds a run's files. The dir is then marked as a run (runtime/owned.py: what `make clean-outputs` may
delete) and the temp files of killed runs in it are removed. `live_pid(dir)` tells whether another process
holds a dir (what `trainer.resume=auto` passes over), `may_record_failure(dir)` whether a failure record may
be written there (never over a finished run, never into a dir this process did not claim and that holds a run).
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from pipeline.errors import OutputError
from pipeline.runtime import owned
from pipeline.runtime.files import clean_stale_temps

LOCK = ".run.lock"
RUN_FILES = ("config.yaml", "last.pt", "metrics.json", "best.safetensors", "best.json", "decision.json")
_held: dict[Path, int] = {}  # claimed dir -> the open lock fd (held until release or process exit)
_claimed: set[Path] = set()  # every dir this process claimed (kept after release, for the failure record)


def _key(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve()


def live_pid(run_dir: str | Path) -> int | None:
    """The pid of another live process holding `run_dir`, or None (free, or held by this process)."""
    key = _key(run_dir)
    if key in _held:
        return None
    try:
        fd = os.open(key / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)  # closing drops our shared lock, if we got it
    return None


def run_files(run_dir: str | Path) -> list[str]:
    """The run files `run_dir` already holds (empty for a new dir or one with only Hydra's log)."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def _foreign(run_dir: Path) -> list[str]:
    """Entries of `run_dir` that neither Hydra (its log, `.hydra/`) nor this module put there."""
    return sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK, owned.MARK, ".hydra")
                  and not p.name.endswith(".log") and not p.name.startswith(".write_test."))


def _not_fresh(run_dir: Path) -> str | None:
    """Why a fresh run may not start in `run_dir`, or None: it must be new, or hold nothing but Hydra's files."""
    found = run_files(run_dir)
    if found:
        return (f"{run_dir} already holds a run ({', '.join(found)}): continue it with trainer.resume={run_dir}, "
                "or start in another dir (output_dir=... or hydra.run.dir=...)")
    foreign = [] if owned.owner(run_dir) == "run" else _foreign(run_dir)
    if foreign:
        return (f"{run_dir} holds files the pipeline did not write (e.g. {foreign[0]}): a run needs a new or empty "
                "dir (output_dir=... or hydra.run.dir=...)")
    return None


def claim(run_dir: str | Path, *, resume: bool = False) -> Path:
    """Lock `run_dir` for this process (see the module doc); a one-line OutputError when another live run holds
    it or, for a fresh run, when it already holds a run's files."""
    run_dir = Path(run_dir)
    key = _key(run_dir)
    if key in _held:
        return run_dir
    problem = None if resume else _not_fresh(run_dir)  # before the lock file: a refused dir gets nothing new
    if problem:
        raise OutputError(problem)
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"Run dir {run_dir} is not writable ({e.strerror or e}): set output_dir=... to a writable "
                          "dir, or fix its permissions / free disk space") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OutputError(f"{run_dir} is in use by a live run (pid {pid}): wait for it to end, or start in another "
                          "dir (output_dir=... or hydra.run.dir=...)") from None
    problem = None if resume else _not_fresh(run_dir)  # again: a run that started in it meanwhile
    if problem:
        os.close(fd)
        raise OutputError(problem)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[key] = fd
    _claimed.add(key)
    owned.mark(run_dir, "run")
    clean_stale_temps(run_dir)
    return run_dir


def release(run_dir: str | Path) -> None:
    """Drop this process's lock on `run_dir` (a no-op when not held)."""
    fd = _held.pop(_key(run_dir), None)
    if fd is not None:
        os.close(fd)


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def may_record_failure(run_dir: str | Path) -> bool:
    """True where a failed run may write its failure record: not a finished run's dir, not another live run's,
    and either claimed by this process or holding no run yet (a config error before the claim)."""
    run_dir = Path(run_dir)
    if _finished(run_dir) or live_pid(run_dir) is not None:
        return False
    return _key(run_dir) in _claimed or not run_files(run_dir)
