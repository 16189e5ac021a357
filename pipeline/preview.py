"""Entry point: `python -m pipeline.preview dataset=X [augment=heavy] [n=16] [out=file.png]` (or `make preview`).

A PNG grid of augmented training samples (reports/preview_grid.py), so the augmentation can be judged by eye.
"""
from __future__ import annotations

import sys

import timm

from pipeline.config import check_values, compose_config
from pipeline.data import augment
from pipeline.data.build import list_data
from pipeline.data.folder import Split
from pipeline.errors import exit_on_user_error
from pipeline.model import backbone
from pipeline.reports.preview_grid import write_preview
from pipeline.runtime import owned
from pipeline.runtime.cli import positive_int, split_args
from pipeline.runtime.process import tune_allocator

OWN_KEYS = {"n": 16, "out": None}  # this command's own keys; every other key=value overrides conf/


def main(argv: list[str] | None = None) -> None:
    tune_allocator()
    with exit_on_user_error():
        own, overrides = split_args(sys.argv[1:] if argv is None else argv, OWN_KEYS, prog="preview")
        n = positive_int(own, "n", prog="preview")
        cfg = compose_config(overrides)
        check_values(cfg)
        backbone.check_arch(cfg.backbone.name)  # preprocessing only: no weights needed
        d, b = cfg.dataset, cfg.backbone
        listing, _ = list_data(cfg.dataset)  # train/ tree, class folders or dataset.manifest
        classes, (paths, labels) = listing.classes, listing.splits["train"]
        data_cfg = backbone.data_config(timm.create_model(b.name, pretrained=False), b.input_size or d.input_size)
        data_cfg["grayscale_input"] = bool(cfg.augment.grayscale_input)
        transform = augment.build_train_transform(data_cfg, augment.TrainAugment.from_group(cfg.augment))
        out = owned.prepare_output_file(own["out"] or f"outputs/preview/{d.name}_{cfg.augment.preset}.png",
                                        "choose another out=... (a new file)")
        path = write_preview(Split(paths, labels, classes, listing.multilabel), transform, data_cfg, out, n=n,
                             seed=cfg.seed, max_pixels=d.max_pixels)
        print(f"Wrote {path} ({len(classes)} classes, augment preset '{cfg.augment.preset}')")


if __name__ == "__main__":
    main()
