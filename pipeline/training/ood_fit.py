"""The "unknown" rule fitted at the end of a run (`trainer.ood`): which images are too unlike the training data
for any of its classes to be the answer (model/ood.py; the choice of score: bench/bench_ood.py, docs/export.md).

On the shipped model (TTA and temperature applied): its penultimate features of a seeded sample of at most
`trainer.ood_fit_images` train images (eval transform, no augmentation) are the kNN score's bank; the val images'
scores (as many at most) set the threshold that keeps `trainer.ood_keep` of them. best.json gets `ood`
(score, threshold, counts) and best.safetensors the score's tensors (`ood.` keys); export, `pipeline.load` and predict
apply them. Rank 0 only, after the test split is scored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data import folder
from pipeline.data.loaders import TrainingData
from pipeline.model import checkpoint, ood
from pipeline.runtime.devices import Accel
from pipeline.training import loop

_logger = logging.getLogger(__name__)

MIN_VAL = 20  # fewer val images: the 5% tail of their scores is one image, no threshold


@dataclass(frozen=True)
class OodSettings:
    score: str  # trainer.ood: knn | off
    keep: float  # trainer.ood_keep: the share of val images the threshold keeps as known
    fit_images: int  # trainer.ood_fit_images: train images sampled for the bank
    seed: int


class FeatureOutput(torch.nn.Module):
    """A classifier whose output is its penultimate features (model/ood.py), so loop.predict_logits reads them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return ood.logits_and_features(self.model, images)[1]


def images_needed(splits: folder.DatasetSplits, settings: OodSettings) -> int:
    """Eval images' worth of work the fit does (what the time budget keeps time for)."""
    if settings.score == "off" or len(splits.val) < MIN_VAL:
        return 0
    return min(len(splits.train), settings.fit_images) + min(len(splits.val), settings.fit_images)


def fit_rule(model: torch.nn.Module, data: TrainingData, accel: Accel, settings: OodSettings
             ) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """(record for best.json `ood`, the score's tensors) from the shipped `model`; ({"skipped": why}, None) where
    it is off or val is too small."""
    splits = data.splits
    if settings.score == "off":
        return {"skipped": "trainer.ood=off"}, None
    if len(splits.val) < MIN_VAL:
        return {"skipped": f"{len(splits.val)} val images, fewer than {MIN_VAL} to set a threshold on"}, None
    features = FeatureOutput(model).eval()
    train = splits.train.sample(settings.fit_images, settings.seed)
    f_train, y_train = loop.predict_logits(features, data.eval_loader(train, accel.device), accel.device, accel=accel)
    scorer = ood.fit_knn(f_train)
    val = splits.val.sample(settings.fit_images, settings.seed + 1)  # the threshold's sample: as many at most
    f_val, _ = loop.predict_logits(features, data.eval_loader(val, accel.device), accel.device, accel=accel)
    with torch.inference_mode():
        val_scores = scorer(torch.from_numpy(f_val)).numpy()
    threshold = ood.keep_threshold(val_scores, settings.keep)
    record = {"score": settings.score, "k": scorer.k, "threshold": threshold, "keep": settings.keep,
              "train_images": len(y_train),
              "val_images": len(f_val), "features": int(f_train.shape[1]),
              "val_flagged": float(np.mean(val_scores < threshold))}
    _logger.info("Unknown-image rule: %s score on %d train images' features, threshold %.4g keeps %.1f%% of %d val "
                 "images (trainer.ood)", settings.score, len(y_train), threshold, 100 * (1 - record["val_flagged"]),
                 len(f_val))
    return record, {k: v.contiguous() for k, v in scorer.state_dict().items()}


def save_rule(run_dir: Path, record: dict, tensors: dict[str, torch.Tensor] | None, name: str = "best") -> None:
    """`ood` into `<name>.json` and the score's tensors (under model/ood.py's PREFIX) into `<name>.safetensors`, as
    one new generation of the checkpoint."""
    meta = {**checkpoint.read_checkpoint_meta(run_dir, name), ood.KEY: record}
    weights = checkpoint.read_weights(run_dir / f"{name}.safetensors")
    weights = {k: v for k, v in weights.items() if not k.startswith(ood.PREFIX)}
    checkpoint.save_weights(run_dir, name, {**weights, **ood.prefixed(tensors or {})}, meta)


def fit_and_save(run_dir: Path, model: torch.nn.Module, data: TrainingData, accel: Accel,
                 settings: OodSettings) -> dict:
    """Fit the rule on the shipped `model` and save it into `best`; returns the record (metrics.json `ood`)."""
    record, tensors = fit_rule(model, data, accel, settings)
    save_rule(run_dir, record, tensors)
    return record
