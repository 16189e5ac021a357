"""Errors a user can fix. Entry points print them as one line (no traceback) and exit with code 2."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class PipelineError(Exception):
    """Something in the user's config, data or environment; the message names it and the fix."""


class ConfigError(PipelineError, ValueError):
    """A config value or input that is out of range or of the wrong shape."""


class MissingFileError(PipelineError, FileNotFoundError):
    """A dataset, weights file or run dir that is not where the config says."""


class OutputError(PipelineError, OSError):
    """The run dir or a file in it cannot be written (unwritable dir, disk full)."""


@contextmanager
def exit_on_user_error():
    """A PipelineError is the user's to fix: one line on stderr, exit code 2, no traceback."""
    try:
        yield
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
