"""Entry point: `python -m pipeline.audit dataset=X [out=DIR] [key=value ...]` (or `make audit dataset=X [OUT=DIR]`).

Audits a dataset without training (docs/audit.md): counts, sizes, colour modes, odd files, exact and near
duplicates, train/eval leakage, storage shortcuts (data/data_audit.py) and label-error candidates from the
configured pretrained backbone's features (features/label_issues.py). Writes `audit.json`, `audit.md` and,
when there is something to show, `near_duplicates.png` and `label_issues.png` to `out` (default
outputs/audit/<dataset>).
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import check_values, compose_config
from pipeline.data.build import build_data
from pipeline.data.data_audit import run_audit
from pipeline.errors import PipelineError, exit_on_user_error
from pipeline.features import cached_fit, label_issues
from pipeline.model.backbone import input_side
from pipeline.reports.audit_report import audit_section, write_audit
from pipeline.runtime import owned
from pipeline.runtime.cli import split_args
from pipeline.runtime.devices import select_device
from pipeline.runtime.files import write_text
from pipeline.runtime.process import set_threads, tune_allocator

OWN_KEYS = {"out": None}  # this command's own keys; every other key=value overrides conf/


def find_label_issues(cfg, data) -> dict:
    """The label-error report with the configured backbone; a backbone that cannot be built (e.g. hub weights
    offline) skips this check only, and so does multi-label data (it compares single labels)."""
    if data.multilabel:
        return {"skipped": "multi-label data: the label-error check compares single labels", "flagged": 0,
                "candidates": []}
    try:
        model, eval_tf, weights_desc = label_issues.audit_model(
            cfg.backbone, len(data.classes), input_size=cfg.dataset.input_size,
            grayscale_input=cfg.augment.grayscale_input, seed=cfg.seed)
    except PipelineError as e:
        return {"skipped": f"backbone {cfg.backbone.name} not available: {e}", "flagged": 0, "candidates": []}
    device = select_device(cfg.trainer.device)
    source = cached_fit.FeatureSource(cached_fit.extraction(cfg.features, cfg.trainer, device), cfg.backbone.name,
                                      eval_tf)
    return label_issues.find_candidates(model, data, source, audit=cfg.audit, seed=cfg.seed, weights_desc=weights_desc)


def main(argv: list[str] | None = None) -> None:
    tune_allocator()
    with exit_on_user_error():
        own, overrides = split_args(sys.argv[1:] if argv is None else argv, OWN_KEYS, prog="audit")
        cfg = compose_config(overrides)
        check_values(cfg)
        set_threads(cfg.trainer.threads)
        data, root = build_data(cfg.dataset, seed=cfg.seed)
        out = owned.prepare_output_dir(own["out"] or Path("outputs/audit") / cfg.dataset.name, "audit",
                                       "choose another out=... (a new or empty dir, or an earlier audit's)")
        side = input_side(cfg.backbone.name, cfg.backbone.input_size or cfg.dataset.input_size)
        data, report = run_audit(data, name=cfg.dataset.name, root=root, dedup=cfg.dataset.dedup, checks=cfg.audit,
                                 seed=cfg.seed, min_side=side)
        report["label_issues"] = find_label_issues(cfg, data)
        sheets = write_audit(out, report, cfg.dataset.max_pixels)
        text = "\n".join(audit_section(report))
        write_text(out / "audit.md", text + "\n")
        print(text)
        print(f"\nWrote {', '.join(str(p) for p in [out / 'audit.json', out / 'audit.md', *sheets])}")


if __name__ == "__main__":
    main()
