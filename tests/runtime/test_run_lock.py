"""runtime/run_lock.py: one live run per dir; a fresh run never in a dir that holds a run or the user's files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import OutputError
from pipeline.runtime import owned, run_lock

HOLD = """
import sys, time
from pipeline.runtime import run_lock
run_lock.claim(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def held_elsewhere(tmp_path):
    """A run dir a live child process holds."""
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    yield run_dir, child
    child.kill()
    child.wait()


def test_a_live_run_holds_its_dir_until_it_dies(held_elsewhere):
    run_dir, child = held_elsewhere
    assert run_lock.live_pid(run_dir) == child.pid
    with pytest.raises(OutputError, match=rf"live is in use by a live run \(pid {child.pid}\): wait"):
        run_lock.claim(run_dir, resume=True)
    assert not run_lock.may_record_failure(run_dir)
    child.kill()  # kill -9: the kernel drops the lock
    child.wait()
    assert run_lock.live_pid(run_dir) is None
    run_lock.claim(run_dir, resume=True)
    run_lock.release(run_dir)


def test_a_fresh_run_refuses_a_dir_that_holds_a_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_lock.claim(run_dir)
    assert owned.owner(run_dir) == "run"
    (run_dir / "metrics.json").write_text(json.dumps({"status": "ok"}))
    run_lock.release(run_dir)
    with pytest.raises(OutputError, match=r"already holds a run \(metrics.json\): continue it with trainer.resume="):
        run_lock.claim(run_dir)
    assert not run_lock.may_record_failure(run_dir)  # a finished run's metrics are never replaced


def test_a_fresh_run_refuses_a_dir_of_the_users_files_but_takes_hydras_own(tmp_path):
    user = tmp_path / "project"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files the pipeline did not write \(e.g. notes.txt\)"):
        run_lock.claim(user)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]  # not marked, not even a lock file left
    assert (user / "notes.txt").read_text() == "mine"
    hydra_made = tmp_path / "hydra"
    (hydra_made / ".hydra").mkdir(parents=True)
    (hydra_made / "train.log").write_text("log")
    run_lock.claim(hydra_made)
    run_lock.release(hydra_made)


def test_a_failure_is_recorded_only_where_this_process_may_write(tmp_path):
    fresh = tmp_path / "fresh"  # a config error before any claim: nothing of a run there
    fresh.mkdir()
    assert run_lock.may_record_failure(fresh)
    other = tmp_path / "other"  # another command's run, this one was refused: not ours to write
    other.mkdir()
    (other / "config.yaml").write_text("x")
    assert not run_lock.may_record_failure(other)
    mine = tmp_path / "mine"
    mine.mkdir()
    run_lock.claim(mine)
    (mine / "config.yaml").write_text("x")
    run_lock.release(mine)
    assert run_lock.may_record_failure(mine)


def test_resume_passes_over_a_live_run_and_refuses_to_join_it(held_elsewhere, tmp_path, monkeypatch, caplog):
    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from pipeline.training import resume

    run_dir, child = held_elsewhere
    (run_dir / "last.pt").write_bytes(b"state")  # killed or still training: no metrics.json
    OmegaConf.save(OmegaConf.create({"dataset": {"name": "folder", "root": str(tmp_path / "data")}}),
                   run_dir / "config.yaml")
    runs = tmp_path / "outputs" / "runs"
    runs.mkdir(parents=True)
    run_dir.rename(runs / run_dir.name)
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(["dataset=folder", f"dataset.root={tmp_path / 'data'}", "trainer.resume=auto"])
    with caplog.at_level("INFO"):
        assert resume.find_run_to_resume(cfg.trainer.resume, output_dir=cfg.output_dir, dataset=cfg.dataset) is None
    assert f"passing over {Path('outputs/runs') / run_dir.name}, still training (pid {child.pid})" in caplog.text
    cfg.trainer.resume = str(runs / run_dir.name)
    with pytest.raises(OutputError, match=rf"is still training \(pid {child.pid}\); wait for it to end"):
        resume.find_run_to_resume(cfg.trainer.resume, output_dir=cfg.output_dir, dataset=cfg.dataset)
