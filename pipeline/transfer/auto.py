"""The `auto` strategy: choose the transfer mode from dataset size and measured similarity.

Size: every class has >= `large_per_class` train images and the total is >= `large_total` -> large.
Similarity to the pretraining domain is measured, not assumed: on a bounded, class-balanced sample we
cross-validate a logistic regression on (a) the frozen pretrained features and (b) raw 16x16 RGB pixels.
The gain (a) - (b) says how much the pretrained representation adds for *this* data. Natural photos gain a
lot (ants/bees: features 0.94 vs pixels 0.24, chance-rescaled); glyphs or X-rays, where pixels already carry
the signal, gain little. Gain >= `similar_gain` -> similar. Then the four classic cases:

    small + similar   -> linear_probe  (features already separate the classes)
    large + similar   -> partial       (stem + first stage stay frozen; the rest adapts)
    small + different -> partial       (shallow unfreeze: only the top `shallow_unfreeze` groups train)
    large + different -> finetune      (everything trains)

Under `trainer.time_limit` (the default) the probe comes first and a fine-tune follows only where one can pay:
budgeted/auto_budget.py plans its depth and keeps it only where a paired test on val says it beats the probe;
small + similar data may get one too (mode_under_time_limit).
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.data.folder import Split
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.runtime.files import write_json
from pipeline.transfer.separability import cv_separability, measure_separability, sample_per_class

_logger = logging.getLogger(__name__)


def pixel_separability(sample: Split, side: int = 16, seed: int = 0) -> dict:
    """Same CV probe on raw downsampled pixels: the baseline that says how hard the task is without transfer."""
    rows, labels = [], []
    for path, label in zip(sample.paths, sample.labels):
        try:
            image = load_rgb(path)
        except ImageDecodeError:
            continue
        rows.append(cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).ravel() / 255.0)
        labels.append(label)
    return cv_separability(np.stack(rows), np.asarray(labels), seed)


def size_class(counts: dict[str, int], large_per_class: int, large_total: int) -> dict:
    smallest = min(counts.values())
    total = sum(counts.values())
    return {"min_per_class": smallest, "total": total, "large_per_class": large_per_class,
            "large_total": large_total,
            "size": "large" if smallest >= large_per_class and total >= large_total else "small"}


def choose_mode(size: str, similar: bool, n_groups: int, *, similar_freeze_depth: int,
                shallow_unfreeze: int) -> tuple[str, int, str]:
    """(mode, freeze_depth, rule) for the four size x similarity cases."""
    if size == "small" and similar:
        return "linear_probe", n_groups, "small + similar -> linear probe on frozen features"
    if size == "large" and similar:
        depth = min(similar_freeze_depth, n_groups)
        return "partial", depth, f"large + similar -> fine-tune with the first {depth} generic groups frozen"
    if size == "small":
        depth = max(0, n_groups - shallow_unfreeze)
        return "partial", depth, f"small + different -> shallow unfreeze: top {n_groups - depth} groups train"
    return "finetune", 0, "large + different -> fine-tune all layers"


def mode_under_time_limit(decision: dict, similar_freeze_depth: int) -> dict:
    """Under `trainer.time_limit`, small + similar data (rule: linear probe) may also fine-tune after its probe, as
    large + similar data does (the first `similar_freeze_depth` groups frozen); budgeted/auto_budget.py plans
    whether one can pay and keeps it only where a paired test on val says it is better."""
    if decision["mode"] != "linear_probe":
        return decision
    depth = min(similar_freeze_depth, decision["n_groups"])
    return {**decision, "mode": "partial", "freeze_depth": depth, "rule_mode": "linear_probe",
            "rule": f"{decision['rule']}; under trainer.time_limit the probe comes first, then a fine-tune where one "
                    f"can pay, kept only where a paired test on val says it is better"}


def decide_strategy(model: torch.nn.Module, train_split: Split, transform, device: torch.device, *, n_groups: int,
                    auto_cfg, seed: int = 0) -> dict:
    """Measure size and similarity, apply the rule, and return the decision record."""
    size = size_class(train_split.counts(), auto_cfg.large_per_class, auto_cfg.large_total)
    features = measure_separability(model, train_split, transform, device, max_per_class=auto_cfg.sample_per_class,
                                    max_total=auto_cfg.sample_total, seed=seed)
    sample = sample_per_class(train_split, auto_cfg.sample_per_class, auto_cfg.sample_total, seed)
    pixels = pixel_separability(sample, seed=seed)
    gain = features["separability"] - pixels["separability"]
    similar = bool(gain >= auto_cfg.similar_gain)
    mode, depth, rule = choose_mode(size["size"], similar, n_groups, similar_freeze_depth=auto_cfg.similar_freeze_depth,
                                    shallow_unfreeze=auto_cfg.shallow_unfreeze)
    decision = {"mode": mode, "freeze_depth": depth, "rule": rule, "n_groups": n_groups, **size,
                "similarity": {"feature_separability": features["separability"],
                               "feature_cv_balanced_accuracy": features["cv_balanced_accuracy"],
                               "feature_logme": features["logme"],  # recorded for comparison, not in the rule
                               "pixel_separability": pixels["separability"],
                               "pixel_cv_balanced_accuracy": pixels["cv_balanced_accuracy"],
                               "gain": gain, "similar_gain_threshold": auto_cfg.similar_gain,
                               "similar": similar, "sample_images": features["n_samples"],
                               "seconds": features["seconds"]}}
    _logger.info("Auto strategy: %s (%s; min/class %d, total %d; feature sep %.3f, pixel sep %.3f, gain %.3f)",
                 mode, rule, size["min_per_class"], size["total"], features["separability"],
                 pixels["separability"], gain)
    return decision


def decision_paragraph(d: dict) -> list[str]:
    s = d["similarity"]
    return ["## Strategy decision (auto)", "",
            f"The training set has {d['total']} images, at least {d['min_per_class']} per class, so it counts as "
            f"**{d['size']}** (large needs >= {d['large_per_class']} per class and >= {d['large_total']} in all). "
            f"On a sample of {s['sample_images']} images, frozen pretrained features separate the classes with "
            f"cross-validated balanced accuracy {s['feature_cv_balanced_accuracy']:.3f} (separability "
            f"{s['feature_separability']:.3f}), raw pixels with {s['pixel_cv_balanced_accuracy']:.3f} (separability "
            f"{s['pixel_separability']:.3f}): a gain of {s['gain']:.3f}, so the data is **"
            f"{'similar' if s['similar'] else 'different'}** (threshold {s['similar_gain_threshold']}). "
            f"Rule: {d['rule']}. Chosen: `strategy.mode={d['mode']}`, freeze depth {d['freeze_depth']} of "
            f"{d['n_groups']} layer groups.", ""]


def write_decision(run_dir: Path, decision: dict) -> None:
    write_json(Path(run_dir) / "decision.json", decision)
