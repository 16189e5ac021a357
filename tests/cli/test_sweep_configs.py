"""Sweep configs: Optuna search space, joblib (local parallel) and Slurm launchers compose and work."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR
from pipeline.model.freezing import resolve_freeze_depth
from pipeline.reports.sweep import collect_runs
from pipeline.runtime.process import set_threads

ROOT = Path(__file__).resolve().parents[2]


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _multirun(tmp_path: Path, tiny_folder: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pipeline.train", "-m", "dataset=folder", f"dataset.root={tiny_folder}",
            "backbone=tiny", "trainer=smoke", f"data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(args + list(overrides), cwd=ROOT, capture_output=True, text=True, timeout=400)


def test_optuna_search_composes_seeded_tpe_and_its_space_parses():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.samplers import TPESampler

    cfg = compose_with_hydra("hparams_search=optuna", "seed=7")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.n_trials > 0 and sweeper.max_failure_rate == 1.0
    sampler = instantiate(sweeper.sampler)
    assert isinstance(sampler, TPESampler) and sweeper.sampler.seed == 7  # follows the run seed
    params = OmegaConf.to_container(sweeper.params)
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    assert set(space) == set(params) and not fixed
    for key in params:  # every searched key exists in the config (a typo would search nothing)
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert cfg.strategy.mode == "partial"
    for depth in space["strategy.freeze_depth"].choices:  # valid for tf_efficientnet_lite0 (8 layer groups)
        resolve_freeze_depth("partial", depth, 8)


def test_optuna_sweep_runs_trials_and_records_a_failed_one(tiny_folder, tmp_path):
    """3 tiny trials; the depth choice includes an out-of-range value: that trial fails, the study goes on."""
    proc = _multirun(tmp_path, tiny_folder, "hparams_search=optuna", "hydra.sweeper.n_trials=3",
                     "strategy.freeze_depth=choice(99,all)", "hydra.sweeper.sampler.seed=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = tmp_path / "sweep"
    rows = collect_runs(sweep)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok", "failed"}
    assert all("out of range" in r["error"] for r in rows if r["status"] == "failed")
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in results and "optuna best value" in (sweep / "report.md").read_text()


def test_set_threads_follows_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(0) == 1 and torch.get_num_threads() == 1
        assert set_threads(2) == 2  # an explicit trainer.threads wins
    finally:
        torch.set_num_threads(before)


def test_local_parallel_launcher_composes_one_thread_per_job():
    cfg = compose_with_hydra("hydra/launcher=local_parallel")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.prefer == "processes"
    assert launcher.n_jobs * int(cfg.hydra.job.env_set.OMP_NUM_THREADS) == 2  # sized for 2 cores
    assert cfg.trainer.threads == 0  # 0 = follow OMP_NUM_THREADS


@pytest.mark.long
def test_local_parallel_sweep_runs_jobs_with_one_thread_each(tiny_folder, tmp_path):
    proc = _multirun(tmp_path, tiny_folder, "hydra/launcher=local_parallel", "strategy=partial",
                     "strategy.freeze_depth=all,0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted((tmp_path / "sweep").rglob("metrics.json"))
    assert len(runs) == 2
    assert [json.loads(p.read_text())["threads"] for p in runs] == [1, 1]
    assert "runs: 2 (2 ok)" in (tmp_path / "sweep" / "report.md").read_text()


def test_slurm_launcher_composes_and_builds_a_valid_sbatch_script(tmp_path, monkeypatch):
    """No Slurm here: a fake `srun` on PATH lets submitit build (not submit) the job array script."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    cfg = compose_with_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.job.name=train")
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)  # the same split as SlurmLauncher.launch
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})  # validates
    script = executor._executor._make_submission_file_text("python -m pipeline.train", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=240", "#SBATCH --mem=32GB", "#SBATCH --job-name=train"):
        assert line in script, line
    with pytest.raises(NameError, match="partitoin"):  # a typo'd key is refused the same way
        executor.update_parameters(slurm_partitoin="gpu")
