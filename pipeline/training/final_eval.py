"""The run's final numbers: the best epoch's val metrics and the best checkpoint's test metrics, evaluated as it
ships (TTA and temperature: model/calibrated.py)."""
from __future__ import annotations

from pathlib import Path

from pipeline.data.loaders import TrainingData
from pipeline.model import checkpoint
from pipeline.model.calibrated import wrap_for_inference
from pipeline.runtime.devices import Accel
from pipeline.training import calibration, loop
from pipeline.training.fit import FitResult
from pipeline.training.metrics import val_test_gap


def evaluate_best(result: FitResult, run_dir: Path, data: TrainingData, accel: Accel, *, monitor: str,
                  progress: bool) -> tuple[dict, dict]:
    """(metrics with the best epoch's val and the best checkpoint's test, {split: (logits, labels)})."""
    best_epoch, splits, device = result.best_epoch, data.splits, accel.device
    metrics = {"run_dir": str(run_dir), "monitor": monitor, "best_epoch": best_epoch}
    if best_epoch == 0 and (run_dir / "best.json").is_file():  # auto's probe (epoch 0) stayed best
        metrics["val"] = checkpoint.read_checkpoint_meta(run_dir)["val_metrics"]
    else:
        chosen = "ema_val_" if (result.weight_averaging or {}).get("chosen") == "ema" else "val_"  # ema
        row = result.history[best_epoch - 1 if best_epoch else -1]
        metrics["val"] = {k.removeprefix(chosen): v for k, v in row.items() if k.startswith(chosen)}
    evals = {"val": result.best_val}
    if splits.test is not None and len(splits.test):
        best_model, best_meta = checkpoint.load_checkpoint(run_dir, "best")  # DDP: read by rank 0, broadcast
        best_model = wrap_for_inference(best_model, best_meta)  # TTA + temperature: the shipped model's numbers
        test_loader = data.eval_loader(splits.test, device)
        metrics["test"], *test_out = loop.evaluate(best_model.to(device), test_loader, result.eval_loss, accel,
                                                   len(splits.classes), progress=progress, desc="test")
        evals["test"] = tuple(test_out)
        metrics["val_test_gap"] = val_test_gap(*evals["val"], *evals["test"])
    if result.calibration:
        metrics["calibration"] = calibration.add_test_record(result.calibration, *evals["test"]) \
            if "test" in evals else result.calibration
    return metrics, evals
