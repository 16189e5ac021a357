"""`strategy.head_init=probe` (LP-FT, Kumar et al. 2022): when backbone groups fine-tune, the new classifier starts
from a linear probe instead of zero, so the first steps do not push random-head gradients into the pretrained
features.

The probe is the cached linear-probe head (features/cached_fit.py): features of train and val from the frozen pretrained
backbone under the eval transform (the same disk cache as linear_probe runs), the head trained by `train_head`
on its own budget (features.head_epochs / head_patience: cached_fit.HeadFit) with the run's class weights and prior
bias, then copied into `model.get_classifier()`. Under torchrun every rank gets the gathered features and trains the
same (seeded, CPU) head, as the cached path does. A resumed run keeps its restored weights.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pipeline.config import BACKBONE_MODES
from pipeline.features.cached_fit import FeatureSource, HeadFit, extract_all, train_head
from pipeline.features.heads import HeadData, install_head
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
    val (logits, labels); the last two are empty for a resumed run, which fits no new probe."""
    info: dict
    val: dict = field(default_factory=dict)
    best_val: tuple | None = None


def init_head(fit_probe: Callable[[str], Probe], *, head_init: str, head: str, mode: str, run_dir: Path,
              resumed: bool = False) -> Probe | None:
    """`head_init` (strategy.head_init) = probe for a resolved `mode` whose backbone trains: `fit_probe(h)` fits and
    installs the probe head h = INIT_HEADS[`head`] (features.head) into the model. None where the head starts as
    before (head_init=zero, or a mode that trains the head alone). A resumed run keeps its restored weights (the
    saved summary in `run_dir`, no new probe)."""
    if head_init != "probe":
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
    probe = fit_probe(INIT_HEADS[head])
    probe.info["role"] = "init"
    _logger.info("strategy.head_init=probe: the fine-tune starts from a linear probe (val %s)",
                 {k: round(v, 4) for k, v in probe.val.items() if isinstance(v, float)})
    if distributed.is_main():
        write_json(path, probe.info)
    return probe


def fit_probe(model: torch.nn.Module, splits, source: FeatureSource, fit: HeadFit) -> Probe:
    """Fit the `fit.head` ("linear" | "logistic" | "auto": features/heads.py) on cached features of the frozen
    pretrained backbone (train and val under `source.eval_tf`; no augmented views) and install it as `model`'s
    classifier."""
    start = time.perf_counter()
    # Only the backbone's own pre-logits feed its classifier: other features.depths need the cached linear probe
    # and were rejected already for these modes (features/cached_fit.py use_cached_path).
    feats = extract_all(model, splits, replace(source, views=None), [HEAD])
    x, y = feats["train"]["features"].numpy(), feats["train"]["labels"].numpy()
    val_x, val_y = feats["val"]["features"].numpy(), feats["val"]["labels"].numpy()
    with torch.random.fork_rng(devices=[]):  # the seeded head leaves the fine-tune's random streams as they were
        fitted = train_head(HeadData(x, y, val_x, val_y, len(splits.classes)), fit, standardize=False)
    install_head(model, [HEAD], fitted["weight"], fitted["bias"])  # copied to the classifier's device and dtype
    monitor = fit.training.monitor
    best_row = fitted["history"][fitted["best_epoch"] - 1]
    info = {"kind": "probe", "head": fitted["head"], f"val_{monitor}": best_row[f"val_{monitor}"],
            "best_epoch": fitted["best_epoch"], "epochs": len(fitted["history"]),
            "seconds": round(time.perf_counter() - start, 2),
            "cache": {s: "hit" if feats[s]["hit"] else "miss" for s in ("train", "val")}}
    _logger.info("Probe on cached features: val %s %.4f (best epoch %d of %d, %d train rows, %.1f s)", monitor,
                 info[f"val_{monitor}"], info["best_epoch"], info["epochs"], len(y), info["seconds"])
    return Probe(info, {k[4:]: v for k, v in best_row.items() if k.startswith("val_")}, fitted["best_val"])


def head_init_section(info: dict) -> list[str]:
    """summary.md paragraph: where the fine-tune's head started."""
    score = next((f"{k} {v:.4f}" for k, v in info.items() if k.startswith("val_")), "val score not recorded")
    resumed = " This run was resumed: it continued from its restored weights." if info.get("resumed") else ""
    epochs = f" after {info['epochs']} epoch(s) (best {info['best_epoch']})" if "epochs" in info else ""
    return ["## Head initialisation (linear probe)", "",
            f"The classifier started from a linear probe on cached frozen-backbone features ({score}{epochs})."
            f"{resumed}", ""]
