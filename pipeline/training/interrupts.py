"""Graceful SIGINT/SIGTERM: the loops finish the step they are in, save `last.pt` (training/resume.py) and stop
with a one-line message naming the exact resume command; the process exits with 128 + the signal's number."""
from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.model.checkpoint import LAST

_logger = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: `last.pt` was saved; the message says how to resume. `code` = 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum


def resume_command(run_dir: Path) -> str:
    """The exact command: this interpreter (relative when under the current dir, e.g. .venv/bin/python)."""
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"{exe} -m pipeline.train trainer.resume={Path(run_dir).resolve()}"


class GracefulStop:
    """Context manager: the first SIGINT/SIGTERM sets a flag (the loop finishes its step and saves `last`);
    a second one stops at once (KeyboardInterrupt). Callable: True once a stop was requested.
    Inside `at_once(...)` a signal raises TrainingInterrupted straight away (work whose state is already saved)."""

    def __init__(self):
        self.signum, self._previous, self._now = None, {}, None

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
        self.signum = signum
        if self._now is not None:
            raise self.interrupted(*self._now)
        _logger.warning("%s received: finishing the current step, then saving %s (send it again to stop at once)",
                        signal.Signals(signum).name, LAST)

    @contextmanager
    def at_once(self, run_dir: Path, where: str) -> Iterator[None]:
        """Within the block a signal (or one received before it) raises `interrupted(run_dir, where)`."""
        if self():
            raise self.interrupted(run_dir, where)
        self._now = (run_dir, where)
        try:
            yield
        finally:
            self._now = None

    def __enter__(self) -> "GracefulStop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a launcher's worker thread): keep the defaults
                _logger.debug("cannot install a %s handler outside the main thread", sig)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def interrupted(self, run_dir: Path, where: str) -> TrainingInterrupted:
        """The one-line stop message (`where`: e.g. "at step 3 of epoch 2") with the resume command."""
        name = signal.Signals(self.signum).name
        return TrainingInterrupted(f"Interrupted by {name} {where}; saved {Path(run_dir) / LAST}. "
                                   f"Resume with: {resume_command(run_dir)}", self.signum)
