"""Errors a user can fix. Entry points print them as one line (no traceback) and exit with code 2."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterable


class PipelineError(Exception):
    """Something in the user's config, data or environment; the message names it and the fix."""


class ConfigError(PipelineError, ValueError):
    """A config value or input that is out of range or of the wrong shape."""


class MissingFileError(PipelineError, FileNotFoundError):
    """A dataset, weights file or run dir that is not where the config says."""


class OutputError(PipelineError, OSError):
    """The run dir or a file in it cannot be written (unwritable dir, disk full)."""


class ModelFileError(ConfigError):
    """A model or weights file that is damaged, truncated, modified, or does not match its JSON."""


def check_choice(key: str, value: Any, choices: Iterable, also: str = "") -> None:
    """The one check (and message) for a setting that must be one of a fixed set of values (`also`: the other
    form it may take, named in the message)."""
    options = [str(c) for c in choices]
    if isinstance(value, bool) or str(value) not in options:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(options)}"
                          + (f" or {also}" if also else ""))


@contextmanager
def exit_on_user_error():
    """A PipelineError is the user's to fix: one line on stderr, exit code 2, no traceback."""
    try:
        yield
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
