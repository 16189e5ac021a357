"""Storage invariance: do the shipped model's val predictions hold when the files are stored another way?

A model can learn how a class's files were stored (greyscale vs RGB, JPEG quality, chroma subsampling) instead
of what they show, and val, stored the same way, cannot tell (data/shortcuts.py finds such storage differences
in the data; this measures whether the model uses them). A seeded sample of val images is predicted as decoded,
then re-encoded to each common storage of data/reencode.py; the share of predictions that flip and the change in
the metric are reported per storage, and the model is flagged where a change is beyond the val sample's
standard error. Runs at the end of every run on rank 0 (`audit.storage_invariance`, `audit.invariance_images`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data import folder
from pipeline.data.loaders import LoaderSettings
from pipeline.data.reencode import STORAGES, Reencoded, Storage
from pipeline.runtime.devices import Accel
from pipeline.runtime.seeding import seed_worker
from pipeline.training import loop
from pipeline.training.metrics import balanced_accuracy_se, classification_metrics

_logger = logging.getLogger(__name__)

MIN_IMAGES = 20  # fewer images of a storage than this: its change is not judged (the SE would be most of it)


@dataclass(frozen=True)
class InvarianceCheck:
    max_images: int  # val images sampled (0: the check is off)
    monitor: str  # trainer.monitor: judged on it when it is accuracy, else on balanced accuracy
    seed: int


def _metric(name: str, labels: np.ndarray, preds: np.ndarray) -> tuple[float, float]:
    """(value, binomial standard error) of accuracy or balanced accuracy."""
    if name == "accuracy":
        p = float(np.mean(preds == labels))
        return p, float(np.sqrt(p * (1 - p) / len(labels)))
    return balanced_accuracy_se(labels, preds)


def _predict(model: torch.nn.Module, split: folder.Split, storage: Storage | None, eval_tf,
             settings: LoaderSettings, accel: Accel) -> tuple[np.ndarray, np.ndarray]:
    dataset = folder.ImageDataset(split, eval_tf, settings.max_pixels, cache=Reencoded(storage, settings.max_pixels))
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.eval_batch_size, num_workers=settings.num_workers,
                                         collate_fn=settings.collate(), worker_init_fn=seed_worker)
    return loop.predict_logits(model, loader, accel.device, accel=accel)


def images_predicted(val: folder.Split, files: dict[str, dict], check: InvarianceCheck) -> int:
    """Images the check will predict: its sample as decoded, then each storage's share of it (what the time budget
    keeps time for)."""
    sample = val.sample(check.max_images, check.seed) if check.max_images else folder.Split([], [], [])
    if len(sample) < MIN_IMAGES:
        return 0
    counts = [min(sum(storage.applies(files.get(p, {})) for p in sample.paths), storage.max_images or len(sample))
              for storage in STORAGES]
    return len(sample) + sum(n for n in counts if n >= MIN_IMAGES)


def check_storage_invariance(model: torch.nn.Module, val: folder.Split, files: dict[str, dict], eval_tf,
                             settings: LoaderSettings, accel: Accel, check: InvarianceCheck) -> dict:
    """The record of metrics.json `storage_invariance` (see module doc); `files`: the probe records by path."""
    metric = "accuracy" if check.monitor == "accuracy" else "balanced_accuracy"
    sample = val.sample(check.max_images, check.seed)
    if len(sample) < MIN_IMAGES:
        return {"skipped": f"{len(sample)} val images, fewer than {MIN_IMAGES}"}
    logits, labels = _predict(model, sample, None, eval_tf, settings, accel)
    preds = logits.argmax(1)
    baseline, se = _metric(metric, labels, preds)
    by_path = dict(zip(sample.paths, range(len(sample))))
    record = {"images": len(sample), "metric": metric, "baseline": baseline, "se": se, "storages": {},
              "not_run": {}}
    for storage in STORAGES:
        subset = [i for i, p in enumerate(sample.paths) if storage.applies(files.get(p, {}))][:storage.max_images]
        if len(subset) < MIN_IMAGES:
            record["not_run"][storage.name] = f"{len(subset)} sampled val images it applies to ({storage.scope})"
            continue
        part = sample.take(subset)
        new_logits, new_labels = _predict(model, part, storage, eval_tf, settings, accel)
        if len(new_labels) != len(subset):  # a file failed to re-decode: compare like with like
            continue
        idx = np.array([by_path[p] for p in part.paths])
        before, part_se = _metric(metric, labels[idx], preds[idx])
        after, _ = _metric(metric, new_labels, new_logits.argmax(1))
        change = after - before
        record["storages"][storage.name] = {
            "images": len(subset), "flipped": float(np.mean(new_logits.argmax(1) != preds[idx])), "metric": after,
            "change": change, "se": part_se, "beyond_se": bool(abs(change) > part_se),
            "accuracy": classification_metrics(new_labels, new_logits.argmax(1), len(val.classes))["accuracy"]}
    record["flagged"] = any(r["beyond_se"] for r in record["storages"].values())
    if record["flagged"]:
        worst = max(record["storages"].items(), key=lambda kv: abs(kv[1]["change"]))
        _logger.warning("STORAGE SENSITIVE: re-encoding val images as %s flips %.1f%% of predictions and moves val %s "
                        "%+.1f points (SE %.1f): the model depends on how files are stored, not only on what they "
                        "show. Deploy on files stored like the training data; where the audit warns of a SHORTCUT or "
                        "CONFOUND, re-encode the classes alike and retrain", worst[0],
                        100 * worst[1]["flipped"], metric, 100 * worst[1]["change"], 100 * worst[1]["se"])
    return record
