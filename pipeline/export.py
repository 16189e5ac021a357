"""Entry point: `python -m pipeline.export run=<run dir> [out=DIR] [export.opset=18 ...]` (or `make export RUN=...`).

Writes a shippable export dir (ship/saving.py): model.safetensors, model.json, ONNX, TorchScript and
MODEL_CARD.md, each format parity-checked against the PyTorch checkpoint on real images. Own keys: `run`
(required), `out` (default <run>/export), `checkpoint` (default best), `images` (a folder for the parity
check; default the run's val split). `export.*` keys override the run's export settings (conf/export/).
"""
from __future__ import annotations

import logging
import sys

from omegaconf import OmegaConf

from pipeline.errors import ConfigError, exit_on_user_error
from pipeline.runtime.cli import require, split_args
from pipeline.runtime.process import tune_allocator
from pipeline.ship.saving import export_run

OWN_KEYS = {"run": None, "out": None, "checkpoint": "best", "images": None}


def parse_overrides(overrides: list[str]) -> dict:
    """`export.key=value` overrides as {key: value} (YAML values: export.formats=[onnx] is a list)."""
    wrong = [o for o in overrides if not o.startswith("export.")]
    if wrong:
        raise ConfigError(f"export: unknown argument(s) {wrong}; it takes run=, out=, checkpoint=, images= and "
                          "export.* settings (e.g. export.opset=18)")
    return OmegaConf.to_container(OmegaConf.from_dotlist(overrides)).get("export", {}) if overrides else {}


def main(argv: list[str] | None = None) -> int:
    tune_allocator()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error():
        own, overrides = split_args(sys.argv[1:] if argv is None else argv, OWN_KEYS, prog="export")
        run = require(own, "run", prog="export", example="run=outputs/runs/<date>_<dataset>")
        out = export_run(run, own["out"], checkpoint_name=own["checkpoint"], images=own["images"],
                         **parse_overrides(overrides))
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
