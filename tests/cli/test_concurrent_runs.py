"""Real processes started together: each gets a run dir of its own (names unique within a second), and each
dir ends complete and consistent (runtime/run_lock.py, conf/hydra/default.yaml run_id)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_imagefolder
from pipeline.model import checkpoint


@pytest.mark.slow
def test_three_runs_started_together_give_three_complete_dirs(tmp_path):
    data = make_imagefolder(tmp_path / "data", {"blue": 6, "red": 6})
    args = [sys.executable, "-m", "pipeline.train", "dataset=folder", f"dataset.root={data}", "backbone=tiny",
            "trainer.epochs=1", "trainer.num_workers=0", "audit.label_issues=false"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for e in errors]
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 3  # no two in one dir, even when started in the same second
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "ok" and Path(metrics["run_dir"]).name == run.name
        model, meta = checkpoint.load_checkpoint(run, "best")
        assert meta == checkpoint.embedded_meta(run / "best.safetensors")  # weights and JSON of one generation
        assert (run / ".hydra" / "overrides.yaml").is_file() and (run / "train.log").stat().st_size > 0
