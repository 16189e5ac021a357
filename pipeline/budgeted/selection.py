"""What auto under a time limit ships: the probe, the fine-tune's best epoch, or the two as an ensemble.

Selection you can trust (`select`): every candidate is scored on the same val images and a challenger replaces the
incumbent only where a paired bootstrap says it is better (training/paired.py, one-sided at
`strategy.auto.select_alpha`); "not worse by a margin" is not enough.
1. The fine-tune's best epoch replaces the probe where it is better than the probe.
2. The probe + fine-tune ensemble (the mean of their val-calibrated probabilities, model/ensemble.py) replaces the
   model kept in 1 where it is better than that model, and `strategy.auto.ensemble` allows it (the ensemble runs
   two backbones: twice the inference cost).
The run dir keeps each candidate: `probe` (saved when it is fitted), `finetune` (the fine-tune's best epoch, saved
when the ensemble ships) and `best`, the one that ships.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.features.probe_init import Probe
from pipeline.model import checkpoint, ensemble
from pipeline.runtime.files import write_atomic
from pipeline.training import paired

PROBE_NAME, PROBE_VAL = "probe", "probe_val.npz"  # the probe's checkpoint and val logits in the run dir
FINETUNE_NAME = "finetune"  # the fine-tune's best epoch, kept beside an ensemble `best`
KEPT = ("probe", "fine-tune", "ensemble")


@dataclass
class Selection:
    kept: str  # one of KEPT
    why: str
    finetune_vs_probe: dict | None
    ensemble: dict | None
    ensemble_val: tuple[np.ndarray, np.ndarray] | None = None  # the ensemble's val (logits, labels)
    temperatures: list[float] | None = None  # the members' (probe, fine-tune) val-fitted temperatures


def select(probe_val: tuple[np.ndarray, np.ndarray], finetune_val: tuple[np.ndarray, np.ndarray] | None, *,
           monitor: str, alpha: float, ship_ensemble: bool, seed: int = 0) -> Selection:
    """Steps 1 and 2 of the module doc. Each of `probe_val`, `finetune_val`: (val logits, labels) in the val
    split's order."""
    probe_logits, labels = probe_val
    if finetune_val is None or not len(labels):
        return Selection("probe", "no fine-tune epoch was evaluated", None, None)
    finetune_logits, ft_labels = finetune_val
    if not np.array_equal(labels, ft_labels):  # an image one path read and the other skipped: not paired
        return Selection("probe", f"the probe and the fine-tune were scored on different val images ({len(labels)} "
                         f"vs {len(ft_labels)}), so no paired test can replace the probe", None, None)
    test = paired.paired_test(labels, probe_logits, finetune_logits, monitor, seed=seed)
    better = test.better(alpha)
    kept, kept_logits = ("fine-tune", finetune_logits) if better else ("probe", probe_logits)
    mixed, temperatures = paired.mean_probabilities(labels, probe_logits, finetune_logits)
    versus = paired.paired_test(labels, kept_logits, mixed, monitor, seed=seed)
    why = (f"the fine-tune is {'better' if better else 'not better'} than the probe on val by a paired bootstrap: "
           f"{monitor} {test.challenger:.4f} vs {test.incumbent:.4f}, difference {test.difference:+.4f} (90% "
           f"interval {test.low:+.4f}..{test.high:+.4f}), p = {test.p_not_better:.3f} against "
           f"strategy.auto.select_alpha={alpha}")
    shipped = ship_ensemble and versus.better(alpha)
    if shipped:
        kept = "ensemble"
        why += (f"; the probe + fine-tune ensemble is better than the {'fine-tune' if better else 'probe'} by the "
                f"same test: {monitor} {versus.challenger:.4f} vs {versus.incumbent:.4f}, p = "
                f"{versus.p_not_better:.3f}")
    record = {**versus.record(), "better_than_kept": versus.better(alpha), "shipped": shipped,
              "temperatures": [round(t, 4) for t in temperatures]}
    return Selection(kept, why, test.record(), record, (mixed, labels), temperatures)


def save_probe(run_dir: Path, model, meta: dict, probe: Probe) -> None:
    """`probe.safetensors` (the candidate a later selection may promote) and `best` = the probe (epoch 0), with
    its val logits (`probe_val.npz`) for the selection of a resumed run."""
    probe_meta = {**meta, "epoch": 0, "val_metrics": probe.val, "weights_source": "probe"}
    checkpoint.save_checkpoint(run_dir, PROBE_NAME, model, probe_meta)
    checkpoint.save_checkpoint(run_dir, "best", model, probe_meta)
    logits, labels = probe.best_val

    def save(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would add .npz to the temp name
            np.savez(f, logits=logits, labels=labels)

    write_atomic(Path(run_dir) / PROBE_VAL, save)


def load_probe_val(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    path = Path(run_dir) / PROBE_VAL
    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["logits"], data["labels"]


def promote_probe(run_dir: Path) -> None:
    """`best` := the saved probe (weights and JSON, one generation)."""
    weights = checkpoint.read_weights(Path(run_dir) / f"{PROBE_NAME}.safetensors", what="probe checkpoint")
    checkpoint.save_weights(run_dir, "best", weights, checkpoint.read_checkpoint_meta(run_dir, PROBE_NAME))


def ship_ensemble(run_dir: Path, selection: Selection, score: Callable[[np.ndarray, np.ndarray], dict]) -> dict:
    """`best` := the probe + fine-tune ensemble, its val metrics (`score(logits, labels)`) in its JSON; the
    fine-tune's best epoch is kept as `finetune` first, so a repeated selection builds the same ensemble."""
    run_dir = Path(run_dir)
    finetune_meta = checkpoint.read_checkpoint_meta(run_dir, "best")
    if finetune_meta.get("weights_source") != "ensemble":  # best is the fine-tune's best epoch
        finetune = checkpoint.read_weights(run_dir / "best.safetensors")
        checkpoint.save_weights(run_dir, FINETUNE_NAME, finetune, finetune_meta)
    else:  # a repeated selection: the members are on disk already
        finetune_meta = checkpoint.read_checkpoint_meta(run_dir, FINETUNE_NAME)
        finetune = checkpoint.read_weights(run_dir / f"{FINETUNE_NAME}.safetensors", what="finetune checkpoint")
    probe_meta = checkpoint.read_checkpoint_meta(run_dir, PROBE_NAME)
    members = [checkpoint.read_weights(run_dir / f"{PROBE_NAME}.safetensors", what="probe checkpoint"), finetune]
    val_metrics = score(*selection.ensemble_val)
    meta = {**finetune_meta, "weights_source": "ensemble", "val_metrics": val_metrics,
            ensemble.KEY: ensemble.spec(selection.temperatures, ("probe", "fine-tune"),
                                        [probe_meta.get("feature_levels"), finetune_meta.get("feature_levels")])}
    meta.pop("feature_levels", None)  # per member now
    checkpoint.save_weights(run_dir, "best", ensemble.combined_weights(members), meta)
    return val_metrics
