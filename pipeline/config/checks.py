"""The one validator: every constraint of the schema (config/schema.py), checked at start-up before any data is
read, with one message format. The few keys whose valid values take more than a constraint (freeze depth,
class weights, feature workers, export formats, time limit) have a checker in `_CUSTOM`."""
from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any, Callable

from pipeline.config.schema import EXPORT_FORMATS, GROUPS, WEIGHT_MODES, AutoStrategyConfig, StrategyConfig
from pipeline.errors import ConfigError, check_choice


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return "positive" if low == 1 and not low_open or (low == 0 and low_open) else f">= {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_number(key: str, x: Any, low, high, low_open: bool = False, high_open: bool = False,
                 example: Any = None) -> None:
    """The one check (and message) for a numeric setting and its bounds; NaN is never valid."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
    ok = ok and (low is None or (x > low if low_open else x >= low))
    ok = ok and (high is None or (x < high if high_open else x <= high))
    if not ok:
        hint = f" (e.g. {key}={example})" if example is not None else ""
        raise ConfigError(f"{key}={x} must be {_range_text(low, high, low_open, high_open)}{hint}")


def _check_freeze_depth(key: str, x: Any) -> None:
    if x != "all" and (isinstance(x, bool) or not isinstance(x, int) or x < 0):
        raise ConfigError(f"{key}={x!r} is not valid: use an integer >= 0 (layer groups frozen from the input) "
                          "or 'all'")


def _check_class_weights(key: str, x: Any) -> None:
    if hasattr(x, "items"):
        bad = {k: v for k, v in x.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0}
        if bad:
            raise ConfigError(f"{key} values must be numbers >= 0, got {dict(bad)}")
        return
    check_choice(key, x, WEIGHT_MODES, also="a mapping {class_name: weight}")


def _check_auto_or_count(key: str, x: Any) -> None:
    if x != "auto" and (isinstance(x, bool) or not isinstance(x, int) or x < 0):
        raise ConfigError(f"{key}={x} is not valid: use auto or a count >= 0 (e.g. 2)")


def _check_formats(key: str, x: Any) -> None:
    for fmt in list(x):
        check_choice(key, fmt, EXPORT_FORMATS)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh])")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(key: str, x: Any) -> float:
    """Seconds of a duration `<number><s|m|h>` (90s, 10m, 1.5h); anything else is a one-line ConfigError."""
    match = _DURATION.fullmatch(x) if isinstance(x, str) else None
    if match is None or float(match[1]) <= 0:
        raise ConfigError(f"{key}={x!r} is not a duration: use a positive number with a unit s, m or h "
                          f"(e.g. {key}=10m), or null for no limit")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def _check_duration(key: str, x: Any) -> None:
    if x is not None:
        parse_duration(key, x)


_CUSTOM: dict[str, Callable[[str, Any], None]] = {
    "strategy.freeze_depth": _check_freeze_depth, "loss.class_weights": _check_class_weights,
    "features.num_workers": _check_auto_or_count, "export.formats": _check_formats,
    "trainer.time_limit": _check_duration,
}


def check_group(prefix: str, schema: type, values: Any) -> None:
    """Check the values of one group (`values`: a DictConfig or dict) against `schema`'s constraints."""
    for f in fields(schema):
        key = f"{prefix}.{f.name}"
        if f.name not in values:
            continue
        x = values[f.name]
        if schema is StrategyConfig and f.name == "auto":
            check_group(key, AutoStrategyConfig, x)
        elif key in _CUSTOM:
            _CUSTOM[key](key, x)
        elif "choices" in f.metadata:
            check_choice(key, str(x).lower() if isinstance(x, bool) else x, f.metadata["choices"])
        elif "range" in f.metadata and not (x is None and f.metadata["optional"]):
            check_number(key, x, *f.metadata["range"], example=f.metadata["example"])


def check_values(cfg: Any) -> None:
    """Every constraint of the schema, over every group present in `cfg` (raises a one-line ConfigError)."""
    for group, schema in GROUPS.items():
        if group in cfg:
            check_group(group, schema, cfg[group])
    trainer = cfg["trainer"] if "trainer" in cfg else {}
    if "epochs" in trainer and trainer["epochs"] is None and trainer.get("time_limit") is None:
        raise ConfigError("trainer.epochs and trainer.time_limit are both null: give a wall-clock budget "
                          "(e.g. trainer.time_limit=2m) or an epoch count (e.g. trainer.epochs=5)")
