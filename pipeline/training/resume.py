"""Resuming: the `last.pt` training state and finding the run to continue (signals: training/interrupts.py).

`last.pt` (written atomically after every epoch, and mid-epoch on SIGINT/SIGTERM) holds the model,
optimizer, LR schedule, monitor tracker, NaN-guard counters, history, the best epoch's val outputs,
the time budget (`trainer.time_limit`: time spent, measured speed, plan; a resume counts the time spent),
the python/numpy/torch RNGs, the train loader's generator, the balanced sampler's generator, the
train transform's RNGs, the weight average (`trainer.ema`: its weights and update count) and the run's
resolved config. A resumed CPU run repeats the uninterrupted one exactly: same weights and metrics
(runtime/seeding.py lists the random streams).

`trainer.resume`:
- `<run dir>` (or its `last.pt`): continue that run in that dir with its saved config; of this
  command's settings only RUNTIME_KEYS apply (others are ignored with a warning).
- `auto`: with `output_dir` set, continue that dir if it holds an unfinished `last.pt`; otherwise the
  newest run dir next to this run's (Hydra: `outputs/runs/`) that has `last.pt`, no `metrics.json`
  (killed or interrupted; finished and failed runs are left alone) and the same `dataset.name` and
  `dataset.root`. Dirs a live run holds (runtime/run_lock.py) are passed over, and the log says so.
  Nothing found: a fresh run.

The cached linear probe (features/cached_fit.py) saves a small `last.pt` of kind `cached` (its config) when it
starts: its progress is the feature cache, so a resume re-extracts only the missing entries and re-fits the
seeded head, which gives the head of an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config.schema import DatasetConfig
from pipeline.errors import ConfigError, MissingFileError, OutputError
from pipeline.model.checkpoint import LAST, load_state, save_state
from pipeline.runtime import distributed, run_lock, seeding

_logger = logging.getLogger(__name__)

FORMAT = 1
CACHED = "cached"  # `kind` of the cached linear probe's last.pt
# Settings a resumed run takes from the new command line; everything else comes from the saved config.
RUNTIME_KEYS = ("trainer.resume", "trainer.progress", "trainer.num_workers", "trainer.threads", "trainer.device",
                "trainer.grad_clip", "trainer.max_nonfinite_steps", "trainer.keep_last", "dataset.audit_workers",
                "output_dir")


def _runs_root() -> Path:
    """Where this run's sibling run dirs are: Hydra's run dir's parent, else outputs/runs."""
    from hydra.core.hydra_config import HydraConfig
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).parent
    return Path("outputs/runs")


def _same_dataset(run_dir: Path, dataset: DatasetConfig) -> bool:
    """Whether `run_dir`'s saved config.yaml names `dataset` (its name and root)."""
    try:
        saved = OmegaConf.load(run_dir / "config.yaml").dataset
    except Exception:  # noqa: BLE001 - no or unreadable config: not a candidate
        return False
    resolve = lambda r: str(Path(str(r)).expanduser().resolve())
    return saved.name == dataset.name and resolve(saved.root) == resolve(dataset.root)


def _passed_over_live(run_dirs: list[Path]) -> list[Path]:
    """`run_dirs` less those a live run holds (runtime/run_lock.py), which are named in the log."""
    live = {d: run_lock.live_pid(d) for d in run_dirs}
    for run_dir, pid in live.items():
        if pid is not None:
            _logger.info("trainer.resume=auto: passing over %s, still training (pid %s)", run_dir, pid)
    return [d for d, pid in live.items() if pid is None]


def find_run_to_resume(resume: str, *, output_dir: str | None, dataset: DatasetConfig) -> Path | None:
    """The run dir `trainer.resume` (`resume`) names (see the module doc), or None for a fresh run."""
    value = str(resume)
    if value != "auto":
        path = Path(value).expanduser()
        run_dir = path.parent if path.name == LAST else path
        if not (run_dir / LAST).is_file():
            raise MissingFileError(f"trainer.resume={value}: no {LAST} in {run_dir} (give a run dir of a killed or "
                                   "interrupted run, or trainer.resume=auto)")
        if run_lock.live_pid(run_dir) is not None:
            raise OutputError(f"trainer.resume={value}: {run_dir} is still training (pid {run_lock.live_pid(run_dir)}"
                              "); wait for it to end, or stop it first (Ctrl-C / kill: it saves last.pt)")
        return run_dir
    if output_dir:
        run_dir = Path(output_dir)
        unfinished = (run_dir / LAST).is_file() and not (run_dir / "metrics.json").exists()
        return run_dir if unfinished and _passed_over_live([run_dir]) else None
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError("trainer.resume=auto is for single runs; in a sweep set trainer.resume=<job dir> per job")
    root = _runs_root()
    candidates = _passed_over_live([p.parent for p in root.glob(f"*/{LAST}") if not (p.parent / "metrics.json")
                                    .exists() and _same_dataset(p.parent, dataset)])
    return max(candidates, key=lambda d: (d / LAST).stat().st_mtime) if candidates else None


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    return [k for key, v in tree.items()
            for k in (_flat_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]


def _command_keys(saved: dict) -> list[str]:
    """This command's setting keys that a resume takes from the saved config instead (all but RUNTIME_KEYS and
    hydra.*): its Hydra overrides, else every key of the saved config."""
    from hydra.core.hydra_config import HydraConfig
    if HydraConfig.initialized():
        keys = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    else:
        keys = _flat_keys(saved)
    return [k for k in keys if k not in RUNTIME_KEYS and not k.startswith("hydra")]


def adopt_saved_config(cfg: DictConfig, saved: dict, run_dir: Path) -> None:
    """In place: the saved config of the run, with this command's RUNTIME_KEYS and `output_dir=run_dir`."""
    runtime = {k: OmegaConf.select(cfg, k) for k in RUNTIME_KEYS}
    saved_cfg = OmegaConf.create(saved)
    ignored = [k for k in _command_keys(OmegaConf.to_container(saved_cfg))  # settings of this command it ignores
               if OmegaConf.select(cfg, k, default=None) != OmegaConf.select(saved_cfg, k, default=None)]
    if ignored:
        _logger.warning("Resuming with the run's saved config; ignored setting(s) of this command: %s "
                        "(only %s apply on resume)", ", ".join(ignored[:8]), ", ".join(RUNTIME_KEYS))
    cfg.merge_with(saved_cfg)
    for key, value in runtime.items():
        OmegaConf.update(cfg, key, value, merge=False)
    cfg.output_dir = str(run_dir)


def _log_to_run_dir(run_dir: Path) -> None:
    """Under Hydra, also append this command's log to the resumed run's own log file."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized() or Path(HydraConfig.get().runtime.output_dir).resolve() == run_dir.resolve():
        return
    handler = logging.FileHandler(run_dir / f"{HydraConfig.get().job.name}.log", mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    _logger.info("This command's own dir %s only holds its log; the run continues in %s",
                 HydraConfig.get().runtime.output_dir, run_dir)


def _status(metrics_path: Path) -> str | None:
    try:
        return json.loads(metrics_path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_resume(cfg: DictConfig) -> dict | None:
    """Resolve `trainer.resume`; when resuming, adopt the run's config and dir (in place) and return its state."""
    if not cfg.trainer.resume:
        return None
    run_dir = find_run_to_resume(cfg.trainer.resume, output_dir=cfg.output_dir, dataset=cfg.dataset)
    if run_dir is None:
        _logger.info("trainer.resume=auto: no unfinished run of dataset '%s' found; starting a fresh run",
                     cfg.dataset.name)
        return None
    metrics = run_dir / "metrics.json"
    if metrics.exists() and _status(metrics) == "ok":
        raise ConfigError(f"trainer.resume={cfg.trainer.resume}: {run_dir} already finished (metrics.json status "
                          "ok); nothing to resume")
    state = load_state(run_dir / LAST)
    if state.get("format") != FORMAT:
        raise ConfigError(f"{run_dir / LAST} has format {state.get('format')}, this version reads {FORMAT}; "
                          "start a fresh run")
    adopt_saved_config(cfg, state["config"], run_dir)
    _log_to_run_dir(run_dir)
    where = f"step {state['partial']['steps']} of epoch {state['epoch'] + 1}" if state["partial"] else \
        f"the end of epoch {state['epoch']}"
    if state.get("kind") == CACHED:
        where = "the feature cache (missing entries are extracted, then the head is fitted)"
    _logger.info("Resuming %s from %s", run_dir, where)
    return state


def drop_failure_record(run_dir: Path) -> None:
    """A resumed run's stale failure record goes (written again when this run ends); a finished run's stays."""
    metrics = Path(run_dir) / "metrics.json"
    if metrics.exists() and _status(metrics) != "ok":
        metrics.unlink()


def saved_decision(run_dir: Path) -> dict:
    """The auto-strategy decision of the run being resumed (decided once, reused as is)."""
    path = Path(run_dir) / "decision.json"
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: cannot resume a strategy=auto run without its decision; "
                               "start a fresh run")
    return json.loads(path.read_text())


def save_cached_state(run_dir: Path, run_config: dict) -> None:
    """The cached linear probe's `last.pt`: its config (`run_config`: the run's resolved config as a plain dict,
    the checkpoint meta's `config`), so `trainer.resume` finds and continues the run."""
    if distributed.is_main():
        save_state(run_dir, {"format": FORMAT, "kind": CACHED, "epoch": 0, "partial": None, "config": run_config})


def finish(run_dir: Path, keep_last: bool) -> None:
    """A finished run needs no resume state (3x the model size, 4x with trainer.ema): drop `last.pt` unless
    `trainer.keep_last`."""
    if not keep_last:
        (Path(run_dir) / LAST).unlink(missing_ok=True)


def _to_tensors(best_val):
    return None if best_val is None else [torch.from_numpy(np.ascontiguousarray(a)) for a in best_val]


@dataclass(frozen=True)
class Resumable:
    """The live objects of the epoch loop whose state `last.pt` holds: the (unwrapped) model, its optimizer and
    LR schedule, the monitor tracker, the NaN guard, the train loader (its generator, sampler and transform
    RNGs), and where used the fp16 GradScaler (CUDA), the time budget (training/budget.py TimeBudget,
    `trainer.time_limit`) and the weight average (training/averaging.py WeightAverage, `trainer.ema`)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tracker: Any
    guard: Any
    loader: Any
    scaler: Any = None
    budget: Any = None
    averager: Any = None


class LastCheckpoint:
    """Saves and restores everything the epoch loop needs to continue exactly where it stopped: the state of
    `parts` and the run's `run_config` (its resolved config as a plain dict: the checkpoint meta's `config`)."""

    def __init__(self, run_dir: Path, run_config: dict, parts: Resumable):
        self.run_dir, self.run_config, self.parts = Path(run_dir), run_config, parts
        self._epoch_start = None

    def _data_rng(self) -> dict:
        loader = self.parts.loader
        sampler = loader.sampler
        transform = seeding.get_transform_rng_state(loader.dataset.transform)
        return {"loader": loader.generator.get_state() if loader.generator is not None else None,
                "sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
                "transform": transform if not distributed.is_distributed() else distributed.all_gather_object(
                    transform)}  # DDP: one augmentation stream per rank

    def mark_epoch_start(self) -> None:
        """Remember the data streams' state at the start of an epoch (a mid-epoch save replays from it)."""
        self._epoch_start = self._data_rng()

    def save(self, epoch: int, history: list, best_val, partial: dict | None = None) -> None:
        """`epoch` = epochs completed; `partial` = counters of the interrupted next epoch. Called on every
        rank (DDP gathers the ranks' augmentation RNGs), written by rank 0 from the unwrapped model."""
        data_rng = self._epoch_start if partial else self._data_rng()
        if not distributed.is_main():
            return
        p = self.parts
        state = {"format": FORMAT, "epoch": epoch, "partial": partial, "model": p.model.state_dict(),
                 "optimizer": p.optimizer.state_dict(),
                 "optimizer_groups": [g.get("name") for g in p.optimizer.param_groups],
                 "scheduler": p.scheduler.state_dict(), "tracker": p.tracker.state_dict(),
                 "guard": p.guard.state_dict(), "scaler": p.scaler.state_dict() if p.scaler else None,
                 "history": history, "best_val": _to_tensors(best_val),
                 "budget": p.budget.state_dict() if p.budget is not None else None,
                 "global_rng": seeding.get_global_rng_state(),
                 "data_rng": data_rng,
                 "config": self.run_config}
        if p.averager is not None:
            state["ema"] = p.averager.state_dict()
        save_state(self.run_dir, state)
        p.guard.last_good = f"{self.run_dir / LAST} (epoch {epoch}{', mid-epoch' if partial else ''})"

    def restore(self, state: dict) -> tuple[int, dict | None, list, tuple | None]:
        """Load a `save` state (gradual thaws must be replayed first). Returns (first epoch to run, partial
        counters for it, history, best val outputs)."""
        p = self.parts
        groups = [g.get("name") for g in p.optimizer.param_groups]
        if groups != state["optimizer_groups"]:
            raise ConfigError(f"{self.run_dir / LAST}: optimizer groups {state['optimizer_groups']} do not match "
                              f"this model's {groups}; was the config changed? start a fresh run")
        p.model.load_state_dict(state["model"])
        p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        p.tracker.load_state_dict(state["tracker"])
        p.guard.load_state_dict(state["guard"])
        if p.averager is not None:
            if state.get("ema") is None:
                raise ConfigError(f"{self.run_dir / LAST} holds no weight average (saved without trainer.ema); "
                                  "start a fresh run")
            p.averager.load_state_dict(state["ema"])
        if p.scaler is not None and state.get("scaler"):
            p.scaler.load_state_dict(state["scaler"])
        data = state["data_rng"]
        if data["loader"] is not None:
            p.loader.generator.set_state(data["loader"])
        if data["sampler"] is not None:
            p.loader.sampler.load_state_dict(data["sampler"])
        transform = data["transform"]
        if isinstance(transform, list):  # saved by a DDP run: this rank's stream
            if len(transform) != distributed.world_size():
                raise ConfigError(f"{self.run_dir / LAST} was saved by {len(transform)} processes; resume it with "
                                  f"the same number (torchrun --nproc_per_node / NPROC={len(transform)})")
            transform = transform[distributed.rank()]
        seeding.set_transform_rng_state(p.loader.dataset.transform, transform)
        seeding.set_global_rng_state(state["global_rng"])
        if p.budget is not None:  # after the scheduler: a re-plan re-spans it over what is left of the budget
            p.budget.load_state_dict(state.get("budget"), done_epochs=state["epoch"])
        best_val = tuple(t.numpy() for t in state["best_val"]) if state["best_val"] is not None else None
        p.guard.last_good = f"{self.run_dir / LAST} (epoch {state['epoch']})"
        return state["epoch"] + 1, state["partial"], list(state["history"]), best_val
