"""Frozen-backbone features: the one extractor of pooled embeddings (`extract_features`; features/cache.py caches
its output) and how well the pre-logits ones separate the classes."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.data.folder import ImageDataset, Split, collate_skip_none
from pipeline.model.inference import run_batches
from pipeline.model.multidepth import HEAD, pooled_features
from pipeline.runtime.devices import Accel
from pipeline.transfer.logme import logme_score

_logger = logging.getLogger(__name__)

BATCH_SIZE = 32  # of the separability sample's loader


def extract_features(model: torch.nn.Module, loader, levels: Sequence, device: torch.device,
                     channels_last: bool = False) -> dict:
    """Pooled features of `levels` (model/multidepth.py; [HEAD]: timm's `forward_head(pre_logits=True)`) of every
    decodable sample in `loader`, model in eval mode (left so), their labels and the loader's index field where it
    has one, with speed. The one frozen-feature extractor: the feature cache (features/cache.py) and
    `measure_separability` both run it. Empty tensors when nothing decoded (a DDP shard may hold nothing)."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    feats, labels, extras = run_batches(lambda x: pooled_features(model, x, levels), loader,
                                        Accel(device, channels_last=channels_last))
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    seconds = time.perf_counter() - start
    index = extras[0].long() if extras else torch.zeros(0, dtype=torch.long)
    return {"features": feats, "labels": labels, "index": index, "seconds": seconds,
            "img_per_s": len(labels) / max(seconds, 1e-9)}


def sample_per_class(split: Split, max_per_class: int, max_total: int, seed: int) -> Split:
    """A seeded, class-balanced subset (at most `max_per_class` each, `max_total` overall)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.labels)
    per_class = min(max_per_class, max(2, max_total // max(1, len(split.classes))))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep += list(rng.permutation(idx)[:per_class])
    keep = sorted(keep)
    return Split([split.paths[i] for i in keep], [split.labels[i] for i in keep], split.classes)


def cv_separability(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Cross-validated balanced accuracy of a logistic regression on frozen features, rescaled by chance.

    separability = (bal_acc - 1/K) / (1 - 1/K): 0 = chance, 1 = perfectly separated.
    """
    n_classes = len(np.unique(labels))
    folds = int(min(5, np.bincount(labels)[np.bincount(labels) > 0].min()))
    if n_classes < 2 or folds < 2:
        return {"cv_balanced_accuracy": float("nan"), "separability": float("nan"), "folds": folds}
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    preds = cross_val_predict(clf, features, labels, cv=cv)
    bal = float(balanced_accuracy_score(labels, preds))
    chance = 1.0 / n_classes
    return {"cv_balanced_accuracy": bal, "separability": (bal - chance) / (1 - chance), "folds": folds}


def measure_separability(model: torch.nn.Module, split: Split, transform, device: torch.device, *,
                         max_per_class: int = 50, max_total: int = 400, seed: int = 0) -> dict:
    """How well the frozen pretrained features already separate the classes, on a bounded sample."""
    start = time.perf_counter()
    sample = sample_per_class(split, max_per_class, max_total, seed)
    loader = torch.utils.data.DataLoader(ImageDataset(sample, transform), batch_size=BATCH_SIZE,
                                         collate_fn=collate_skip_none)
    was_training = model.training
    out = extract_features(model, loader, [HEAD], device)
    model.train(was_training)
    features, labels = out["features"].numpy(), out["labels"].numpy()
    result = cv_separability(features, labels, seed)
    result["logme"] = logme_score(features, labels) if len(np.unique(labels)) > 1 else float("nan")
    result.update(n_samples=int(len(labels)), feature_dim=int(features.shape[1]),
                  seconds=round(time.perf_counter() - start, 2))
    _logger.info("Frozen-feature separability: CV balanced acc %.3f on %d images (%.1f s)",
                 result["cv_balanced_accuracy"], result["n_samples"], result["seconds"])
    return result
