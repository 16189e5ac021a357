"""bench/chaos.py (`make chaos`): its run-dir check flags what a user could not trust, and a short real round
(kill -9, read-only dir) ends with 0 lost, 0 inconsistent, 0 tracebacks."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("chaos", ROOT / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chaos)


def test_the_run_dir_check_flags_what_a_user_could_not_trust(exported, tmp_path):
    _, run, _ = exported
    good = shutil.copytree(run, tmp_path / "good")
    assert chaos.check_run_dir(good, finished=True) == []
    behind = shutil.copytree(run, tmp_path / "behind")
    meta = json.loads((behind / "best.json").read_text())
    (behind / "best.json").write_text(json.dumps({**meta, "epoch": 99}))
    chaos.checkpoint.load_checkpoint(behind)  # the loader itself puts a stale copy right
    assert chaos.check_run_dir(behind, finished=True) == []
    broken = shutil.copytree(run, tmp_path / "broken")
    (broken / "audit.json").write_text('{"half": ')
    (broken / ".x.json.somehost.1.1.tmp").write_text("")  # a temp name of the writer's
    (broken / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes()[:500])
    problems = " | ".join(chaos.check_run_dir(broken, finished=True))
    assert "audit.json is not valid JSON" in problems and "best does not load" in problems
    assert "temp files left" in problems


@pytest.mark.slow
@pytest.mark.long
def test_a_short_chaos_round_loses_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--kills", "1", "--only", "kill",
                           "readonly", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "chaos.json").read_text())
    assert {r["fault"] for r in rows} == {"kill -9 (finetune path)", "kill -9 (cached path)", "read-only output dir"}
    assert all(r["lost"] == 0 and r["tracebacks"] == 0 and r["consistent"] == r["runs"] for r in rows)
    assert sum(r["injected"] for r in rows) >= 1 and "user files lost" in proc.stdout
