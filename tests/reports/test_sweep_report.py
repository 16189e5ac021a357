"""Sweep report: aggregation of fake run dirs (ok, failed, diverged, killed) and one real tiny multirun."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.reports.sweep import collect_runs, latest_sweep, split_overrides, write_report

ROOT = Path(__file__).resolve().parents[2]
SHARED = ["dataset=hymenoptera", "strategy=partial", "trainer.epochs=3"]


def _metrics(depth: int, trainable: int, val_bal: float, seconds: float, test: bool = False, **extra) -> dict:
    val = {"accuracy": val_bal + 0.01, "balanced_accuracy": val_bal, "macro_f1": val_bal - 0.01, "loss": 0.3}
    history = [{"epoch": e, "train_loss": 0.5 / e, "val_balanced_accuracy": val_bal} for e in (1, 2, 3)]
    out = {"status": "ok", "monitor": "balanced_accuracy", "best_epoch": 2, "val": val, "history": history,
           "train_seconds": seconds, "mode": "partial", "freeze_depth": depth, "n_groups": 8,
           "trainable_params": trainable, "total_params": 3_373_570, **extra}
    if test:
        out["test"] = {k: v - 0.05 for k, v in val.items()}
    return out


def make_run(sweep: Path, num: int, overrides: list[str], metrics: dict | None, cfg_depth="all") -> Path:
    """A run dir as Hydra + pipeline.train leave it: .hydra/{overrides,hydra}.yaml, config.yaml, metrics.json."""
    run = sweep / f"{num}_{','.join(o for o in overrides if not o.startswith('dataset'))}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    cfg = {"strategy": {"mode": "partial", "freeze_depth": cfg_depth}, "trainer": {"monitor": "balanced_accuracy"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def depth_sweep(tmp_path: Path) -> Path:
    """Jobs 0-2 ok (depth all/4/0), 3 failed with an error, 4 diverged (NaN loss), 5 killed (no metrics.json)."""
    sweep = tmp_path / "2025-01-01_12-00-00_hymenoptera"
    make_run(sweep, 0, SHARED + ["strategy.freeze_depth=all"], _metrics(8, 2_562, 0.90, 40.0, test=True))
    make_run(sweep, 1, SHARED + ["strategy.freeze_depth=4"], _metrics(4, 2_900_000, 0.95, 90.0, test=True))
    make_run(sweep, 2, SHARED + ["strategy.freeze_depth=0"], _metrics(0, 3_373_570, 0.93, 150.0, test=True))
    make_run(sweep, 3, SHARED + ["strategy.freeze_depth=99"],
             {"status": "failed", "error": "ConfigError: strategy.freeze_depth=99 is out of range",
              "train_seconds": 0.5, "monitor": "balanced_accuracy"}, cfg_depth=99)
    diverged = _metrics(2, 3_100_000, 0.5, 60.0)
    diverged["history"][1]["train_loss"] = math.nan
    make_run(sweep, 4, SHARED + ["strategy.freeze_depth=2"], diverged, cfg_depth=2)
    killed = make_run(sweep, 5, SHARED + ["strategy.freeze_depth=1"], None, cfg_depth=1)
    (killed / "train.log").write_text("epoch 1/3 ...\nKilled by the OOM killer\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_report_rows_statuses_and_errors(depth_sweep):
    rows = collect_runs(depth_sweep)
    assert [r["job"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "failed", "incomplete"]
    assert [r["freeze_depth"] for r in rows] == [8, 4, 0, 99, 2, 1]  # resolved depth, else the config's
    assert rows[0]["trainable_params"] == 2_562 and rows[0]["train_seconds"] == 40.0
    assert rows[1]["val_balanced_accuracy"] == 0.95 and rows[1]["test_balanced_accuracy"] == pytest.approx(0.90)
    assert rows[3]["error"].startswith("ConfigError: strategy.freeze_depth=99")
    assert "not finite from epoch 2" in rows[4]["error"]
    assert "no metrics.json" in rows[5]["error"] and "OOM killer" in rows[5]["error"]
    assert rows[5]["val_balanced_accuracy"] is None and rows[3]["trainable_params"] is None


def test_report_files_table_and_failed_section(depth_sweep, tmp_path):
    write_report(depth_sweep)
    with (depth_sweep / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and table[1]["freeze_depth"] == "4" and table[1]["val_balanced_accuracy"] == "0.95"
    assert table[3]["status"] == "failed" and "out of range" in table[3]["error"]
    assert table[0]["overrides"] == " ".join(SHARED + ["strategy.freeze_depth=all"])
    md = (depth_sweep / "report.md").read_text()
    assert "runs: 6 (3 ok, 2 failed, 1 incomplete)" in md
    assert "overrides shared by every run: `dataset=hymenoptera strategy=partial trainer.epochs=3`" in md
    assert "best by val balanced_accuracy: job 1 (`strategy.freeze_depth=4`): 0.9500" in md
    assert ("| 1 | `strategy.freeze_depth=4` | ok | partial | 4 | 2.90M (86%) | 90 | 2/3 | 0.9600 | 0.9500 "
            "| 0.9400 | 0.9100 | 0.9000 | 0.8900 |") in md
    assert "| 0 | `strategy.freeze_depth=all` | ok | partial | 8 | 2,562 (0%) | 40 |" in md
    assert "| 3 | `strategy.freeze_depth=99` | failed | partial | 99 |  | 0 |" in md
    failed = md.split("## Failed runs", 1)[1]
    assert "job 3" in failed and "job 4" in failed and "job 5" in failed and "job 1 " not in failed
    assert (depth_sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_by_depth_grid_keeps_both_varying_keys(tmp_path):
    sweep = tmp_path / "grid"
    num = 0
    for lr in ("0.001", "0.01"):
        for depth, n in ((8, 2_562), (0, 3_373_570)):
            over = ["strategy=partial", f"optim.lr={lr}", f"strategy.freeze_depth={'all' if depth else 0}"]
            make_run(sweep, num, over, _metrics(depth, n, 0.8 + num / 100, 10.0 + num))
            num += 1
    rows = write_report(sweep)
    shared, varying = split_overrides(rows)
    assert shared == ["strategy=partial"]
    assert varying[3] == {"optim.lr": "0.01", "strategy.freeze_depth": "0"}
    md = (sweep / "report.md").read_text()
    assert "| 3 | `optim.lr=0.01 strategy.freeze_depth=0` | ok |" in md and "test acc" not in md
    assert "best by val balanced_accuracy: job 3" in md and (sweep / "report.png").is_file()


def test_latest_sweep_is_the_newest_name(tmp_path):
    for name in ("2025-01-01_10-00-00_a", "2025-01-02_09-00-00_b", "2024-12-31_23-00-00_c"):
        (tmp_path / name).mkdir()
    assert latest_sweep(tmp_path).name == "2025-01-02_09-00-00_b"


def test_real_multirun_records_a_failed_job_and_writes_the_report(tiny_folder, tmp_path):
    """Hydra multirun of pipeline.train: job 0 fails (depth out of range), job 1 still runs; the callback reports.

    The sweep dir holds a microsecond timestamp: the report must land in the dir the jobs wrote to.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "-m", "dataset=folder", f"dataset.root={tiny_folder}",
         "backbone=tiny", "trainer=smoke", "strategy=partial", "strategy.freeze_depth=99,all",
         f"data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweeps'}/${{now:%H-%M-%S-%f}}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [sweep] = list((tmp_path / "sweeps").iterdir())
    rows = {r["job"]: r for r in collect_runs(sweep)}
    assert rows[0]["status"] == "failed" and "out of range" in rows[0]["error"]
    assert rows[1]["status"] == "ok" and rows[1]["freeze_depth"] == rows[1]["n_groups"]
    assert 0 < rows[1]["trainable_params"] < rows[1]["total_params"]
    md = (sweep / "report.md").read_text()
    assert "runs: 2 (1 ok, 1 failed)" in md and "## Failed runs" in md
    assert (sweep / "report.csv").is_file() and (sweep / "report.png").is_file()
