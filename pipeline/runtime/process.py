"""Process start-up tuning: glibc allocator settings and torch thread counts.

PyTorch on glibc VMs runs 3-5x slower with the default malloc settings, because
large activations are mmap'ed and returned to the OS every step. The same fix as
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=...` is applied
with `mallopt` when an entry point (`python -m pipeline.*`, the bench scripts) starts, and the Makefile
exports the variables; forked DataLoader workers inherit it. Importing the package does not apply it: a
library user calls `tune_allocator()` (or sets the variables).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

_logger = logging.getLogger(__name__)

# glibc <malloc.h> parameter ids
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
ALLOCATOR_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}
_state = {"applied": None}


def tune_allocator() -> bool:
    """Apply the allocator settings once; returns True when they are in force.

    Skipped when PIPELINE_MALLOC_TUNE=0 (used by the benchmark to measure the slowdown).
    """
    if _state["applied"] is not None:
        return _state["applied"]
    applied = False
    if os.environ.get("PIPELINE_MALLOC_TUNE", "1") != "0":
        os.environ.update({k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ})  # child processes
        libc_name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(libc_name)
            applied = all([
                libc.mallopt(_M_MMAP_MAX, 0) == 1,
                libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1,
                libc.mallopt(_M_TOP_PAD, ctypes.c_int(2**30)) == 1,
            ])
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to fix
            applied = False
    _state["applied"] = applied
    return applied


def set_threads(threads: int | None) -> int:
    """Set torch intra-op threads (default: $OMP_NUM_THREADS if set, else all cores this process may use).

    Parallel sweep jobs get their share through OMP_NUM_THREADS (conf/hydra/launcher/local_parallel.yaml).
    """
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "")
    if (not threads or threads <= 0) and env.isdigit() and int(env) > 0:
        threads = int(env)
    if not threads or threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads
