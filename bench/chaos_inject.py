"""Run a pipeline command with a fault injected at the os layer (bench/chaos.py uses it where no small real
filesystem can be mounted): `python bench/chaos_inject.py MODE N DIR -m pipeline.train key=value ...`.

Only paths under DIR fail. MODE `enospc`: from the N-th call on, `os.replace` (every file the pipeline commits)
fails with ENOSPC, as on a full disk. MODE `erofs`: every `os.mkdir` and every `os.open` for writing fails with
EROFS, as on a read-only filesystem (N unused).
"""
from __future__ import annotations

import errno
import os
import runpy
import sys


def _failing(real, code: int, after: int, under: str, only_writes: bool = False):
    calls = {"n": 0}

    def call(path, *args, **kwargs):
        writes = not only_writes or (args and args[0] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes and os.path.abspath(os.fsdecode(path)).startswith(under):
            calls["n"] += 1
            if calls["n"] >= after:
                raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real(path, *args, **kwargs)
    return call


def inject(mode: str, after: int, under: str) -> None:
    under = os.path.abspath(under)
    if mode == "enospc":
        os.replace = _failing(os.replace, errno.ENOSPC, after, under)
    elif mode == "erofs":
        os.mkdir = _failing(os.mkdir, errno.EROFS, 1, under)
        os.open = _failing(os.open, errno.EROFS, 1, under, only_writes=True)
    else:
        raise SystemExit(f"chaos_inject: unknown mode {mode!r} (enospc | erofs)")


if __name__ == "__main__":
    mode, after, under, flag, module, *rest = sys.argv[1:]
    assert flag == "-m", "usage: chaos_inject.py MODE N DIR -m MODULE ARGS..."
    inject(mode, int(after), under)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
