"""Distillation's teacher (`make distill RUN=<teacher run> backbone=<student>`; the loss: training/distill.py):
a finished run whose logits of every train image are computed once through the feature cache.

- The student trains on the teacher run's images and split: the run's split.csv becomes `dataset.manifest`
  (`adopt_teacher`), so val and test are the images the teacher never trained on.
- The teacher is the run's `best` as it ships (TTA views and temperature applied: its calibrated logits), on its
  own preprocessing. Each train image's logits are a feature-cache entry keyed by the teacher's weights files,
  that preprocessing and the file list (`features.cache_dir`): later students (other backbones, seeds, budgets)
  reuse them, and the first one pays the pass inside its time budget.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.config.schema import DistillConfig
from pipeline.data import augment
from pipeline.data.folder import Split
from pipeline.data.manifest import SPLIT_CSV
from pipeline.errors import ConfigError, MissingFileError
from pipeline.features.cache import Extraction, load_or_extract
from pipeline.model import checkpoint
from pipeline.model.calibrated import wrap_for_inference
from pipeline.model.multidepth import LOGITS

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Teacher:
    """A finished run whose `best` teaches: its dir, class names, preprocessing and architecture."""
    run_dir: Path
    classes: list[str]
    preprocessing: dict
    arch: str
    val_metrics: dict

    @classmethod
    def read(cls, run_dir: str | Path) -> "Teacher":
        run_dir = Path(run_dir).expanduser()
        for name in ("best.json", "best.safetensors", "config.yaml", SPLIT_CSV):
            if not (run_dir / name).is_file():
                raise MissingFileError(f"distill.teacher={run_dir}: no {name} there; give a finished run dir "
                                       "(outputs/runs/<run>, one with best.safetensors and split.csv)")
        meta = checkpoint.read_checkpoint_meta(run_dir)
        return cls(run_dir, list(meta["class_names"]), dict(meta["preprocessing"]), str(meta.get("arch")),
                   dict(meta.get("val_metrics") or {}))

    def weights_hash(self) -> str:
        """sha256 over the files the shipped teacher is built from: a retrained or re-calibrated run gets new logits."""
        digest = hashlib.sha256()
        for name in ("best.safetensors", "best.json"):
            with open(self.run_dir / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()


def adopt_teacher(cfg: DictConfig) -> None:
    """In place, for a fresh distillation run: the teacher's dataset group with its split.csv as the manifest
    (the same images and split), and a warning where this command's class weights differ from the teacher's."""
    teacher = Teacher.read(cfg.distill.teacher)
    saved = OmegaConf.load(teacher.run_dir / "config.yaml")
    cfg.dataset.merge_with(saved.dataset)
    cfg.dataset.manifest = str((teacher.run_dir / SPLIT_CSV).resolve())
    cfg.distill.teacher = str(teacher.run_dir.resolve())
    taught = _plain(OmegaConf.select(saved, "loss.class_weights", default=None))
    if taught != _plain(cfg.loss.class_weights):
        _logger.warning("The teacher trained with loss.class_weights=%s, this student with %s: add "
                        "loss.class_weights=%s to match", taught, cfg.loss.class_weights, taught)
    _logger.info("Distilling %s (%s) into %s on its dataset '%s' and split (%s)", teacher.run_dir, teacher.arch,
                 cfg.backbone.name, cfg.dataset.name, cfg.dataset.manifest)


def teacher_targets(distill: DistillConfig, train: Split, how: Extraction) -> tuple[np.ndarray, dict]:
    """(rows of [label, teacher logits...] for `train`, in its order, as float32; the record for metrics.json).
    A file the teacher's pass could not decode gets NaN logits: the label loss alone trains on it."""
    teacher = Teacher.read(distill.teacher)
    if teacher.classes != list(train.classes):
        raise ConfigError(f"distill.teacher={teacher.run_dir} knows the classes {teacher.classes}, this dataset "
                          f"{list(train.classes)}: a student learns the teacher's own classes")
    model, meta = checkpoint.load_checkpoint(teacher.run_dir, "best", local=True)
    model = wrap_for_inference(model, meta).to(how.device)  # as it ships (final_eval.shipped_model)
    transform = augment.build_eval_transform(teacher.preprocessing)
    entry = load_or_extract(model, train, transform, replace(how, levels=(LOGITS,), image_cache=None,
                                                             device_preprocessing=None),
                            key_parts={"teacher": teacher.weights_hash(), "transform": repr(transform)},
                            name="teacher logits")
    del model
    logits = np.full((len(train), len(teacher.classes)), np.nan, np.float32)
    logits[entry["index"].numpy()] = entry["features"].numpy()
    labels = np.asarray(train.labels, np.int64)
    decoded = ~np.isnan(logits[:, 0])
    agreement = float((logits[decoded].argmax(1) == labels[decoded]).mean()) if decoded.any() else float("nan")
    record = {"teacher": str(teacher.run_dir), "teacher_arch": teacher.arch, "alpha": float(distill.alpha),
              "temperature": float(distill.temperature), "teacher_val": teacher.val_metrics,
              "teacher_train_accuracy": agreement, "images": int(decoded.sum()), "cache_hit": bool(entry["hit"]),
              "seconds": float(entry["seconds"])}
    _logger.info("Teacher logits for %d train images (%s, %.1f s); the teacher agrees with %.1f%% of their labels",
                 record["images"], "cached" if entry["hit"] else "computed", entry["seconds"], 100 * agreement)
    return np.column_stack([labels.astype(np.float32), logits]), record


def _plain(value):
    """A config node as a plain container (a {class: weight} mapping), a plain value as it is."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
