"""The one command-line convention of every entry point: `key=value` arguments, on `make` and `python -m` alike.

An entry point declares its own keys with their defaults (e.g. export: `run`, `out`); every other argument is a
Hydra override of the project config (`group=option`, `a.b=value`, `+a.b=value`, `~a`), composed from conf/
by `pipeline.config.compose_config`. `make <target> X=v` passes Make's own variables as the same keys
(`RUN=r` -> `run=r`). Anything that is not `key=value` is a one-line error naming the convention.
"""
from __future__ import annotations

import re
from typing import Any

from pipeline.errors import ConfigError

_KEY = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/-]*$")


def split_args(argv: list[str], own: dict[str, Any], *, prog: str) -> tuple[dict[str, Any], list[str]]:
    """(the entry point's own keys: defaults updated from `argv`, the remaining Hydra overrides)."""
    values, overrides = dict(own), []
    usage = " ".join(f"{k}=..." for k in own)
    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg.startswith("-") and not arg.startswith(("~", "+")):
            name = arg.lstrip("-").split("=")[0].replace("-", "_")
            raise ConfigError(f"{prog}: '{arg}' is not an option here: every argument is key=value "
                              f"(e.g. {name}=...); this command takes {usage or 'config overrides'} and "
                              "config overrides like trainer.epochs=3")
        if not eq and not arg.startswith("~") or not _KEY.match(key):
            raise ConfigError(f"{prog}: '{arg}' is not key=value; this command takes {usage or 'config overrides'} "
                              "and config overrides like trainer.epochs=3")
        if key in own:
            values[key] = value
        else:
            overrides.append(arg)
    return values, overrides


def require(values: dict[str, Any], key: str, *, prog: str, example: str) -> str:
    """The value of a required own key, or a one-line error with an example."""
    if values.get(key) in (None, ""):
        raise ConfigError(f"{prog} needs {key}=...: e.g. {example}")
    return str(values[key])


def positive_int(values: dict[str, Any], key: str, *, prog: str) -> int:
    """An own key that must be an integer >= 1."""
    text = str(values[key])
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{prog}: {key}={text} must be a positive integer (e.g. {key}=3)")
    return int(text)
