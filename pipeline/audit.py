"""Entry point: `python -m pipeline.audit dataset=X [out=DIR] [key=value ...]` (or `make audit dataset=X [OUT=DIR]`).

Audits a dataset without training (data/audit.py): counts, sizes, colour modes, odd files, duplicates and
train/eval leakage. Writes `audit.json` and `audit.md` to `out` (default outputs/audit/<dataset>).
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import compose_config
from pipeline.data.audit import audit_markdown, input_side, run_audit
from pipeline.errors import exit_on_user_error
from pipeline.runtime.cli import split_args
from pipeline.runtime.files import write_text
from pipeline.runtime.process import tune_allocator
from pipeline.training.setup import build_data
from pipeline.training.validate import validate_values

OWN_KEYS = {"out": None}  # this command's own keys; every other key=value overrides conf/


def main(argv: list[str] | None = None) -> None:
    tune_allocator()
    with exit_on_user_error():
        own, overrides = split_args(sys.argv[1:] if argv is None else argv, OWN_KEYS, prog="audit")
        cfg = compose_config(overrides)
        validate_values(cfg)
        data, root = build_data(cfg)
        out = Path(own["out"] or Path("outputs/audit") / cfg.dataset.name)
        _, report = run_audit(data, name=cfg.dataset.name, root=root, dedup=cfg.dataset.dedup,
                              min_side=input_side(cfg), out_dir=out)
        text = "\n".join(audit_markdown(report))
        write_text(out / "audit.md", text + "\n")
        print(text)
        print(f"\nWrote {out / 'audit.json'} and {out / 'audit.md'}")


if __name__ == "__main__":
    main()
