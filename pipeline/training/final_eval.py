"""The run's final numbers: the best epoch's val metrics and the best checkpoint's test metrics, evaluated as it
ships (TTA and temperature: model/calibrated.py). Where the audit set leaked val/test files aside (data/leaks.py),
those are the leak-free numbers, and `<split>_with_leaks` scores the split with its leaked files put back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.folder import DatasetSplits
from pipeline.data.loaders import TrainingData
from pipeline.model import checkpoint
from pipeline.model.calibrated import wrap_for_inference
from pipeline.runtime.devices import Accel
from pipeline.training import calibration, invariance, loop, ood_fit
from pipeline.training.fit import FitResult
from pipeline.training.metrics import val_test_gap


def evaluate_best(result: FitResult, run_dir: Path, data: TrainingData, accel: Accel, *, monitor: str,
                  progress: bool) -> tuple[dict, dict]:
    """(metrics with the best epoch's val and the best checkpoint's test, {split: (logits, labels)})."""
    best_epoch, splits, device = result.best_epoch, data.splits, accel.device
    metrics = {"run_dir": str(run_dir), "monitor": monitor, "best_epoch": best_epoch}
    shipped = checkpoint.read_checkpoint_meta(run_dir) if (run_dir / "best.json").is_file() else {}
    if best_epoch == 0 and shipped or shipped.get("weights_source") == "ensemble":  # auto kept its probe or ensemble
        metrics["val"] = shipped["val_metrics"]
    else:
        chosen = "ema_val_" if (result.weight_averaging or {}).get("chosen") == "ema" else "val_"  # ema
        row = result.history[best_epoch - 1 if best_epoch else -1]
        metrics["val"] = {k.removeprefix(chosen): v for k, v in row.items() if k.startswith(chosen)}
    evals = {"val": result.best_val}
    best_model = None
    if splits.test is not None and len(splits.test):
        best_model = shipped_model(run_dir, device)
        test_loader = data.eval_loader(splits.test, device)
        metrics["test"], *test_out = loop.evaluate(best_model, test_loader, result.eval_loss, accel,
                                                   len(splits.classes), progress=progress, desc="test")
        evals["test"] = tuple(test_out)
        metrics["val_test_gap"] = val_test_gap(*evals["val"], *evals["test"])
    for name, copies in splits.leaked.items():
        if name in evals:
            best_model = best_model or shipped_model(run_dir, device)
            _, logits, labels = loop.evaluate(best_model, data.eval_loader(copies, device), result.eval_loss, accel,
                                              len(splits.classes), progress=progress, desc=f"{name} (leaked)")
            metrics[f"{name}_with_leaks"] = loop.score_logits(np.concatenate([evals[name][0], logits]),
                                                              np.concatenate([evals[name][1], labels]),
                                                              result.eval_loss, len(splits.classes))
    if result.calibration:
        metrics["calibration"] = calibration.add_test_record(result.calibration, *evals["test"]) \
            if "test" in evals else result.calibration
    return metrics, evals


def shipped_model(run_dir: Path, device: torch.device, *, local: bool = False) -> torch.nn.Module:
    """The best checkpoint as it ships: TTA views and temperature applied (DDP: read by rank 0 and broadcast, so
    every rank calls it; `local`: read by this process alone)."""
    model, meta = checkpoint.load_checkpoint(run_dir, "best", local=local)
    return wrap_for_inference(model, meta).to(device)


REENCODED_COST = 2  # a re-encoded image (encode, decode, predict) costs about 2 eval images (flowers, 2 cores)


def images_after_loop(splits: DatasetSplits, check: invariance.InvarianceCheck, unknown: ood_fit.OodSettings) -> int:
    """Eval images' worth of work after the training loop, which `trainer.time_limit` keeps time for: the test
    split, the leaked copies set aside, the storage-invariance check's passes and the unknown-image rule's."""
    test = len(splits.test) if splits.test is not None else 0
    reencoded = invariance.images_predicted(splits.val, splits.files, check)
    return (test + sum(len(s) for s in splits.leaked.values()) + REENCODED_COST * reencoded
            + ood_fit.images_needed(splits, unknown))
