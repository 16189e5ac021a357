"""Per-epoch curves where people's tools read them: `history.csv` (timm's summary.csv columns), TensorBoard
event files (`trainer.tensorboard`) and MLflow (`trainer.mlflow`, when the package is installed).

Both fits (training/fit.py, features/cached_fit.py) put each epoch's row in their history (train loss, val metrics,
`lr_<group>` per optimizer parameter group) and hand the history to a `RunTracker`. Only rank 0 writes.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from pipeline.config.schema import TrainerConfig
from pipeline.errors import ConfigError
from pipeline.runtime import distributed
from pipeline.runtime.files import write_csv

_logger = logging.getLogger(__name__)

HISTORY_CSV = "history.csv"
TENSORBOARD_DIR = "tensorboard"
# history key -> history.csv column (timm's summary.csv names first, then ours); lr_<group> columns follow
CSV_COLUMNS = {"epoch": "epoch", "train_loss": "train_loss", "val_loss": "eval_loss", "val_accuracy": "eval_top1",
               "val_top5_accuracy": "eval_top5", "val_balanced_accuracy": "eval_balanced_accuracy",
               "val_macro_f1": "eval_macro_f1",
               # trainer.ema: the averaged weights' val scores (training/averaging.py)
               "ema_val_loss": "ema_eval_loss", "ema_val_accuracy": "ema_eval_top1",
               "ema_val_top5_accuracy": "ema_eval_top5", "ema_val_balanced_accuracy": "ema_eval_balanced_accuracy",
               "ema_val_macro_f1": "ema_eval_macro_f1"}
MLFLOW_GROUPS = ("backbone", "strategy", "optim", "loss", "trainer", "features")  # logged as run parameters


def group_lrs(optimizer) -> dict[str, float]:
    """{"lr_<group>": lr} per optimizer parameter group (a group's `.no_decay` twin has the same LR)."""
    out = {}
    for i, group in enumerate(optimizer.param_groups):
        name = str(group.get("name") or f"group{i}").removesuffix(".no_decay")
        out.setdefault(f"lr_{name}", float(group["lr"]))
    return out


def history_table(history: list[dict]) -> tuple[list[str], list[list]]:
    """(header, rows) of history.csv: the CSV_COLUMNS present, then every lr_* column in order of appearance
    (a group thawed later is blank before it exists)."""
    keys = [k for k in CSV_COLUMNS if any(k in h for h in history)]
    keys += list(dict.fromkeys(k for h in history for k in h if k.startswith("lr_")))
    return [CSV_COLUMNS.get(k, k) for k in keys], [[h.get(k, "") for k in keys] for h in history]


def check_mlflow(trainer: TrainerConfig) -> None:
    """`trainer.mlflow=true` needs the mlflow package (checked at start-up)."""
    if trainer.mlflow and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("trainer.mlflow=true needs the mlflow package: pip install mlflow "
                          "(or set trainer.mlflow=false)")


def _flat(tree: dict, prefix: str = "") -> dict:
    return {k: v for key, value in tree.items()
            for k, v in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
                         ).items()}


class RunTracker:
    """Context manager over one fit: `log(history)` after each epoch rewrites history.csv and sends the newest
    row's scalars (step = epoch) to TensorBoard and MLflow. `first_epoch` > 1 (a resumed run): TensorBoard
    drops events a killed process logged from that epoch on, so no epoch appears twice. `run_config`: the run's
    resolved config as a plain dict (the checkpoint meta's `config`): MLflow's experiment is its dataset name,
    and its MLFLOW_GROUPS are the run's parameters."""

    def __init__(self, run_dir: Path, trainer: TrainerConfig, run_config: dict, first_epoch: int = 1):
        self.run_dir, self.trainer, self.run_config = Path(run_dir), trainer, run_config
        self.first_epoch, self.enabled = first_epoch, distributed.is_main()
        self.writer, self.mlflow = None, None

    def __enter__(self) -> RunTracker:
        t = self.trainer
        if self.enabled and t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR),
                                        purge_step=self.first_epoch if self.first_epoch > 1 else None)
        if self.enabled and t.mlflow:
            check_mlflow(t)
            import mlflow
            mlflow.set_experiment(str(self.run_config["dataset"]["name"]))
            mlflow.start_run(run_name=self.run_dir.name)
            groups = {g: self.run_config[g] for g in MLFLOW_GROUPS}
            mlflow.log_params({k: str(v)[:250] for k, v in _flat(groups).items()})
            self.mlflow = mlflow
        return self

    def log(self, history: list[dict]) -> None:
        if not self.enabled or not history:
            return
        header, rows = history_table(history)
        write_csv(self.run_dir / HISTORY_CSV, rows, header=header)
        row = history[-1]
        scalars = {_tag(k): float(v) for k, v in row.items()
                   if k in CSV_COLUMNS and k != "epoch" or k.startswith("lr_")}
        if self.writer is not None:
            for tag, v in scalars.items():
                self.writer.add_scalar(tag, v, row["epoch"])
            self.writer.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=row["epoch"])

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
            self.mlflow.end_run("FINISHED" if exc_type is None else "KILLED" if interrupted else "FAILED")


def _tag(key: str) -> str:
    """TensorBoard tag of a history key: train/loss, val/loss, val/accuracy, ..., lr/head."""
    if key.startswith("lr_"):
        return f"lr/{key[3:]}"
    split, _, name = key.partition("_")
    return f"{split}/{name}"
