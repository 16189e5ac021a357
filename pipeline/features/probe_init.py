"""`strategy.head_init=probe` (LP-FT, Kumar et al. 2022): when backbone groups fine-tune, the new classifier starts
from a linear probe instead of zero, so the first steps do not push random-head gradients into the pretrained
features.

The probe is the cached linear-probe head (features/fit.py): features of train and val from the frozen pretrained
backbone under the eval transform (the same disk cache as linear_probe runs), the head trained by `train_head`
on its own budget (features.head_epochs / head_patience) with the run's class weights and prior bias, then copied
into `model.get_classifier()`. Under torchrun every rank gets the gathered features and trains the same (seeded,
CPU) head, as the cached path does. A resumed run keeps its restored weights.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.config import BACKBONE_MODES
from pipeline.features.fit import extract_all, train_head
from pipeline.features.heads import install_head
from pipeline.model.multidepth import HEAD
from pipeline.runtime import distributed
from pipeline.runtime.files import write_json

_logger = logging.getLogger(__name__)

INFO_FILE = "head_init.json"  # the probe's summary, read back by a resumed run
# features.head -> the head the fine-tune starts from. auto: the linear head, trained on raw features like the
# classifier it becomes. The logistic head's folded standardisation gives low-variance features large weights,
# and fine-tuning from it collapsed (digits, budgeted auto: val balanced accuracy 0.89 for the probe -> 0.21
# after the first fine-tune epoch, against 0.61 from a zero head).
INIT_HEADS = {"auto": "linear", "linear": "linear", "logistic": "logistic"}


@dataclass
class Probe:
    """The fitted probe: `info` (metrics.json `head_init`), its best epoch's val metrics (loss, accuracy, ...) and
    val (logits, labels); the last two are empty for a resumed run, which fits no new probe. `bar`: as auto's
    fallback under a time limit, the val monitor value a fine-tune epoch must reach to replace it
    (probe_fallback.py)."""
    info: dict
    val: dict = field(default_factory=dict)
    best_val: tuple | None = None
    bar: float | None = None


def init_head(model: torch.nn.Module, splits, cfg: DictConfig, run_dir: Path, *, mode: str, device: torch.device,
              eval_tf, data_cfg: dict, image_cache=None, class_weights: torch.Tensor | None = None,
              init_bias: list[float] | None = None, resumed: bool = False, force: bool = False,
              fallback: bool = False) -> Probe | None:
    """Install the probe head into `model` when `strategy.head_init=probe` (or `force`: auto spending a time
    budget, training/budget.py) applies to the resolved `mode`.

    `fallback`: the probe is auto's fallback, not the fine-tune's start (the caller saves it as `best`, then puts
    the fine-tune's own head back): it is the `features.head` the linear_probe mode trains, not INIT_HEADS's.

    Returns the Probe, or None where the head starts as before (head_init=zero, or a mode that trains the head
    alone)."""
    if cfg.strategy.head_init != "probe" and not force:
        return None
    if mode not in BACKBONE_MODES:
        _logger.info("strategy.head_init=probe applies when backbone groups train; mode %s trains the head alone, "
                     "which starts as usual", mode)
        return None
    path = Path(run_dir) / INFO_FILE
    if resumed:
        saved = distributed.from_main(lambda: json.loads(path.read_text()) if path.is_file() else {"kind": "probe"})
        _logger.info("strategy.head_init=probe: resumed run, the restored weights win (no new probe)")
        return Probe({**saved, "resumed": True})
    start = time.perf_counter()
    # Only the backbone's own pre-logits feed its classifier: other features.depths need the cached linear probe
    # and were rejected already for these modes (features/fit.py use_cached_path).
    feats = extract_all(model, splits, cfg, [HEAD], eval_tf=eval_tf, train_tf=None, device=device,
                        image_cache=image_cache, preprocessing=data_cfg, augmented_views=0)
    x, y = feats["train"]["features"].numpy(), feats["train"]["labels"].numpy()
    val_x, val_y = feats["val"]["features"].numpy(), feats["val"]["labels"].numpy()
    with torch.random.fork_rng(devices=[]):  # the seeded head leaves the fine-tune's random streams as they were
        head = train_head(cfg, x, y, val_x, val_y, len(splits.classes), class_weights, init_bias, standardize=False,
                          head=cfg.features.head if fallback else INIT_HEADS[cfg.features.head])
    install_head(model, [HEAD], head["weight"], head["bias"])  # copied to the classifier's device and dtype
    monitor = cfg.trainer.monitor
    best_row = head["history"][head["best_epoch"] - 1]
    score = best_row[f"val_{monitor}"]
    info = {"kind": "probe", "role": "fallback" if fallback else "init", "head": head["head"],
            f"val_{monitor}": score, "best_epoch": head["best_epoch"],
            "epochs": len(head["history"]), "seconds": round(time.perf_counter() - start, 2),
            "cache": {s: "hit" if feats[s]["hit"] else "miss" for s in ("train", "val")}}
    _logger.info("%s: val %s %.4f (best epoch %d of %d, %d train rows, %.1f s)",
                 "Probe on cached features, kept as best unless a fine-tune epoch beats it" if fallback else
                 "strategy.head_init=probe: the fine-tune starts from a linear probe", monitor, score,
                 info["best_epoch"], info["epochs"], len(y), info["seconds"])
    if distributed.is_main():
        write_json(path, info)
    return Probe(info, {k[4:]: v for k, v in best_row.items() if k.startswith("val_")}, head["best_val"])


def head_init_section(info: dict) -> list[str]:
    """summary.md paragraph: where the fine-tune's head started."""
    score = next((f"{k} {v:.4f}" for k, v in info.items() if k.startswith("val_")), "val score not recorded")
    resumed = " This run was resumed: it continued from its restored weights." if info.get("resumed") else ""
    epochs = f" after {info['epochs']} epoch(s) (best {info['best_epoch']})" if "epochs" in info else ""
    return ["## Head initialisation (linear probe)", "",
            f"The classifier started from a linear probe on cached frozen-backbone features ({score}{epochs})."
            f"{resumed}", ""]
