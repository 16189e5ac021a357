"""Composing the project config outside `@hydra.main` (audit, preview) and checking a command line's overrides
before Hydra sees them, so a typo is one line with the fix (Hydra's own report is several)."""
from __future__ import annotations

from dataclasses import fields

from pipeline.config.checks import check_values
from pipeline.config.schema import CONF_DIR, GROUPS, register_configs
from pipeline.errors import ConfigError


def compose_config(overrides: list[str]):
    """The project config (conf/config.yaml) with `overrides`, as `python -m pipeline.train` would compose it,
    without a run dir. A wrong key or value is a one-line ConfigError naming it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = first.removeprefix("In 'config': ").rstrip(".")
        raise ConfigError(f"{what}; {_override_hint(first)}") from None


def _override_hint(message: str) -> str:
    """The fix for a failed override: the group's options, or the keys closest to a typo'd one."""
    import difflib
    import re

    option = re.search(r"Could not find '([\w]+)/([^']+)'", message)
    if option and (CONF_DIR / option.group(1)).is_dir():
        names = sorted(p.stem for p in (CONF_DIR / option.group(1)).glob("*.yaml") if not p.stem.startswith("_"))
        return f"{option.group(1)} is one of: {', '.join(names)}"
    key = re.search(r"override '([\w.]+)'", message)
    if key:
        group, _, leaf = key.group(1).rpartition(".")
        schema = GROUPS.get(group.split(".")[0])
        keys = [f"{group}.{f.name}" for f in fields(schema)] if schema and "." not in group else []
        close = difflib.get_close_matches(key.group(1), keys, n=3)
        if close:
            return f"did you mean {' or '.join(close)}? (keys: conf/{group}/)"
    return "check the key and value against conf/ (e.g. trainer.epochs=3, dataset=hymenoptera)"


def check_overrides(argv: list[str]) -> None:
    """Before `@hydra.main` takes `argv`: compose the config once, so a typo'd key, an unknown option or a
    value outside its constraint is one line (Hydra's own report is several). Multirun and Hydra's flags are
    left to Hydra (a sweep records a failing job and goes on); `hydra.*` overrides are Hydra's own."""
    if any(a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    check_values(compose_config(overrides))


def sweep_kind() -> str | None:
    """None for a single run; "grid" under Hydra's basic sweeper; "search" under an optimising sweeper (optuna)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "grid" if str(HydraConfig.get().sweeper.get("_target_", "")).endswith(".BasicSweeper") else "search"
