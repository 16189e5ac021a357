"""Run set-up: where the run dir is, and what claiming it does beyond the lock (runtime/run_lock.py's tests)."""
import subprocess
import sys

from pipeline.runtime import files, run_lock
from pipeline.training.run_setup import claim_run_dir, resolve_run_dir


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_output_dir_is_the_run_dir_and_outside_hydra_a_fresh_one_under_outputs(tmp_path):
    assert resolve_run_dir(str(tmp_path / "mine")) == tmp_path / "mine"
    first = resolve_run_dir(None)
    assert first.parts[:2] == ("outputs", "runs") and first != tmp_path


def test_claiming_cleans_the_caches_of_killed_runs(tmp_path):
    """A killed run's temp files in the feature cache (and its subdirs) go; a live process's stay."""
    cache, dead = tmp_path / "features", _dead_pid()
    (cache / "lite0").mkdir(parents=True)
    stale = [cache / f".a.pt.{files._HOST}.{dead}.1.tmp", cache / "lite0" / f".b.pt.{files._HOST}.{dead}.1.tmp"]
    live = cache / f".c.pt.{files._HOST}.1.1.tmp"  # pid 1 is alive
    for p in stale + [live]:
        p.write_bytes(b"half")
    run_dir = claim_run_dir(tmp_path / "run", resume=False, cache_dirs=[str(cache), None])
    try:
        assert run_dir.is_dir() and not any(p.exists() for p in stale) and live.exists()
    finally:
        run_lock.release(run_dir)
