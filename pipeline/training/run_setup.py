"""Run set-up for the train entry point: the run dir resolved, claimed and recorded, and the resume state. It
reads the whole config, as the entry points do; what it hands on is typed."""
from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.runtime import distributed, run_lock
from pipeline.runtime.files import clean_stale_temps, ensure_writable_dir, write_text
from pipeline.training import resume, validate


def resolve_run_dir(output_dir: str | None) -> Path:
    """The run dir: `output_dir`, else Hydra's (conf/hydra/default.yaml), else outputs/runs/<time>_<pid>."""
    if output_dir:
        return Path(output_dir)
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else \
        Path("outputs/runs") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"


def claim_run_dir(run_dir: Path, *, resume: bool, cache_dirs: list[str | None]) -> Path:
    """Create, check and lock the run dir (runtime/run_lock.py: one live run per dir, a fresh run never in a dir
    that holds one), and clean the temp files killed runs left in the caches (`cache_dirs`)."""
    run_dir = ensure_writable_dir(run_dir)
    run_lock.claim(run_dir, resume=resume)
    clean_cache_temps([Path(d) for d in cache_dirs if d])
    return run_dir


def clean_cache_temps(dirs: list[Path]) -> None:
    """Temp files that killed runs left in the feature and image caches (the run dir's own: run_lock.claim)."""
    for d in dirs + [sub for d in dirs if d.is_dir() for sub in d.iterdir() if sub.is_dir()]:
        clean_stale_temps(d)


def write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/{config,hydra,overrides}.yaml` as Hydra writes them. conf/hydra/default.yaml sets
    `hydra.output_subdir: null` so that Hydra itself never rewrites the record of a run whose dir is refused."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    hydra_cfg = HydraConfig.get()
    record = {"config.yaml": cfg, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
              "overrides.yaml": hydra_cfg.overrides.task}
    for name, node in record.items():
        write_text(run_dir / ".hydra" / name, OmegaConf.to_yaml(node))


def prepare_run(cfg: DictConfig) -> tuple[dict | None, Path]:
    """Resume state and run dir. Under torchrun rank 0 alone resolves them (it alone touches files) and the
    other ranks receive them (and the resumed run's config); they also show no progress bars."""
    distributed.init_from_env()
    main = distributed.is_main()
    resumed = resume.prepare_resume(cfg) if main else None  # trainer.resume: adopts the run's config and dir
    validate.validate_config(cfg)  # before any heavy work

    def claim() -> Path:
        run_dir = claim_run_dir(resolve_run_dir(cfg.output_dir), resume=resumed is not None,
                                cache_dirs=[cfg.features.cache_dir, cfg.dataset.cache_dir])
        if resumed is None:
            write_hydra_record(run_dir, cfg)
        return run_dir

    run_dir = distributed.main_run_dir(claim)
    if resumed is not None:
        resume.drop_failure_record(run_dir)  # only now that this process holds the dir
    resumed = distributed.broadcast_object(resumed)
    if not main:
        if resumed is not None:
            resume.adopt_saved_config(cfg, resumed["config"], run_dir)
        cfg.trainer.progress = False
    return resumed, run_dir
