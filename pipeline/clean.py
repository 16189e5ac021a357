"""Entry point: `python -m pipeline.clean [dir=outputs]` (or `make clean-outputs`): delete run and sweep dirs.

Only dirs the pipeline made and marked as a run or a sweep (runtime/owned.py) are deleted, and never one a
live run holds (runtime/run_lock.py); everything else under `dir` (exports, audits, bench results, files of
your own) is left and counted.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from pipeline.errors import ConfigError, exit_on_user_error
from pipeline.runtime import owned, run_lock
from pipeline.runtime.cli import split_args

OWN_KEYS = {"dir": "outputs"}
KINDS = ("run", "sweep")


def _live(directory: Path) -> bool:
    """A live run holds `directory` or (a sweep) a job dir inside it."""
    return run_lock.live_pid(directory) is not None or any(
        run_lock.live_pid(lock.parent) is not None for lock in directory.rglob(run_lock.LOCK))


def clean_outputs(root: str | Path) -> tuple[list[Path], list[Path], int]:
    """Delete the marked run and sweep dirs under `root`. Returns (deleted, live ones kept, other entries kept)."""
    deleted, live, kept = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        kept += len(filenames)
        for name in list(dirnames):
            path = Path(dirpath) / name
            if owned.owner(path) not in KINDS:
                continue
            dirnames.remove(name)  # not walked into: deleted whole, or kept whole
            if _live(path):
                live.append(path)
            else:
                shutil.rmtree(path)
                deleted.append(path)
    return deleted, live, kept


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error():
        own, extra = split_args(sys.argv[1:] if argv is None else argv, OWN_KEYS, prog="clean")
        if extra:
            raise ConfigError(f"clean: unknown key(s) {extra}; it takes dir=DIR (default outputs)")
        root = Path(own["dir"])
        if not root.is_dir():
            print(f"{root}: nothing to clean (no such dir)")
            return 0
        deleted, live, kept = clean_outputs(root)
    print(f"Deleted {len(deleted)} run/sweep dir(s) under {root}; kept {len(live)} still running"
          + (f" ({', '.join(str(p) for p in live[:3])})" if live else "")
          + f" and {kept} other file(s) (not marked as a run: exports, audits, your own files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
