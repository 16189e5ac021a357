"""Resume after a crash: kill -9 mid-write, SIGINT mid-epoch, `auto` discovery; same-seed determinism.

One tiny run is the reference: gradual unfreezing (the optimizer grows during training), a balanced
sampler (its own generator) and light augmentation (albumentations' own RNG), 3 epochs of 2 steps.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_cfg, write_tiny_folder
from pipeline.errors import ConfigError, MissingFileError
from pipeline.model import checkpoint
from pipeline.train import train
from pipeline.training import interrupts, resume
from pipeline.transfer import auto

ROOT = Path(__file__).resolve().parents[2]
RUN = ["trainer=smoke", "dataset=folder", "backbone=tiny", "strategy=gradual", "strategy.warmup_epochs=1",
       "dataset.sampler=balanced", "augment=light", "trainer.epochs=3", "trainer.max_train_batches=2",
       "trainer.keep_last=true"]
TIMING = {"train_seconds", "train_img_per_s"}


def _strip(history: list) -> list:
    return [{k: v for k, v in e.items() if k not in TIMING} for e in history]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny dataset and the reference (uninterrupted) run, shared by the tests of this module."""
    base = tmp_path_factory.mktemp("resume")
    data = write_tiny_folder(base / "data")
    ref = train(_cfg(base / "ref", data))
    return {"base": base, "data": data, "ref": ref}


def _cfg(out: Path, data: Path, *extra: str):
    return compose_cfg([f"output_dir={out}", f"data_dir={out.parent / 'cache'}",
                        f"backbone.cache_dir={ROOT / 'data/weights'}", f"dataset.root={data}", *RUN, *extra])


def _assert_same_run(got: dict, ref: dict) -> None:
    """Every number but wall time, and the best and final weights, bit for bit."""
    assert _strip(got["history"]) == _strip(ref["history"])
    assert got["best_epoch"] == ref["best_epoch"] and got["val"] == ref["val"]
    for name in ("best.safetensors",):
        a, b = load_file(Path(got["run_dir"]) / name), load_file(Path(ref["run_dir"]) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = checkpoint.load_state(Path(got["run_dir"]) / "last.pt")["model"]
    b = checkpoint.load_state(Path(ref["run_dir"]) / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_identical_runs_and_another_seed_does_not(world):
    short = ("trainer.epochs=1", "trainer.max_train_batches=2")
    one, two = (train(_cfg(world["base"] / name, world["data"], *short)) for name in ("one", "two"))
    _assert_same_run(one, two)
    other = train(_cfg(world["base"] / "seed1", world["data"], *short, "seed=1"))
    assert other["history"][0]["val_loss"] != one["history"][0]["val_loss"]  # the test can tell runs apart


# Runs pipeline.train in a child; when the 3rd last.pt (epoch 3) is written but not yet renamed into
# place, it writes a marker and waits there to be killed from outside.
_KILL_ME = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, ".")
from pipeline.runtime import files
marker, commits, original = Path(sys.argv[1]), [], files.os.replace
def replace(tmp, path):  # the rename that commits a file (runtime/files.py write_atomic)
    if Path(path).name == "last.pt":
        commits.append(path)
        if len(commits) == 3:
            marker.write_text("ready")
            time.sleep(300)
    original(tmp, path)
files.os.replace = replace
from pipeline.train import main
sys.argv = ["train"] + sys.argv[2:]
main()
"""


def test_kill_9_mid_write_then_resume_equals_uninterrupted_run(world):
    run, marker = world["base"] / "killed", world["base"] / "marker"
    args = [f"output_dir={run}", f"dataset.root={world['data']}", f"data_dir={world['base'] / 'cache'}",
            f"backbone.cache_dir={ROOT / 'data/weights'}", f"hydra.run.dir={world['base'] / 'hydra'}", *RUN]
    log = world["base"] / "killed.log"
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-c", _KILL_ME, str(marker), *args], cwd=ROOT, stdout=out,
                                 stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), log.read_text()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert list(run.glob(".last.pt.*.tmp")) and not (run / "metrics.json").exists()  # killed between write and rename
    saved = checkpoint.load_state(run / "last.pt")  # the previous last.pt is whole
    assert saved["epoch"] == 2
    assert _strip(saved["history"]) == _strip(world["ref"]["history"][:2])  # same seed, another process: same run
    checkpoint.load_checkpoint(run, "best")

    resumed = train(_cfg(world["base"] / "ignored", world["data"], f"trainer.resume={run}"))
    assert resumed["run_dir"] == str(run) and resumed["resumed_from_epoch"] == 2
    _assert_same_run(resumed, world["ref"])
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"


def test_sigint_mid_epoch_saves_last_and_resume_equals_uninterrupted_run(world, sigint_at_step):
    sigint_at_step.arm(3)  # a real SIGINT to this process during the 3rd step (1st of epoch 2)
    run, handler = world["base"] / "sigint", signal.getsignal(signal.SIGINT)
    with pytest.raises(interrupts.TrainingInterrupted) as err:
        train(_cfg(run, world["data"]))
    message = str(err.value)
    assert "SIGINT at step 1 of epoch 2" in message and f"trainer.resume={run.resolve()}" in message
    assert err.value.code == 130 and signal.getsignal(signal.SIGINT) is handler  # handlers restored
    state = checkpoint.load_state(run / "last.pt")
    assert state["epoch"] == 1 and state["partial"]["steps"] == 1

    sigint_at_step.disarm()
    resumed = train(_cfg(run, world["data"], "trainer.resume=auto"))  # auto + output_dir: that dir
    assert resumed["resumed_from_epoch"] == 1
    _assert_same_run(resumed, world["ref"])


def test_resume_reuses_the_auto_decision_and_finished_runs_are_not_resumed(tiny_folder, cfg_factory, monkeypatch):
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "strategy=auto",
                      "trainer.keep_last=true")
    first = train(cfg)
    run = Path(first["run_dir"])
    decision = json.loads((run / "decision.json").read_text())
    with pytest.raises(ConfigError, match="already finished"):
        train(cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", f"trainer.resume={run}"))
    (run / "metrics.json").unlink()  # as if killed after the last epoch's last.pt

    def no_second_decision(*args, **kwargs):
        raise AssertionError("resume must reuse decision.json, not decide again")

    monkeypatch.setattr(auto, "decide_strategy", no_second_decision)
    again = train(cfg_factory(f"trainer.resume={run}"))  # no dataset given: the saved config is used
    assert again["mode"] == first["mode"] and again["decision"] == decision
    assert again["val"] == first["val"] and again["resumed_from_epoch"] == 1
    assert not (run / "last.pt").exists()  # trainer.keep_last=false (this command's): dropped when finished


def _fake_run(root: Path, name: str, dataset: str, data_root: str, *, finished: bool = False) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"dataset:\n  name: {dataset}\n  root: {data_root}\n")
    (run / "last.pt").write_bytes(b"state")
    if finished:
        (run / "metrics.json").write_text('{"status": "ok"}')
    return run


def test_auto_picks_the_newest_unfinished_run_of_the_same_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = Path("outputs/runs")
    old = _fake_run(runs, "2024-01-01_10-00-00_flowers", "flowers", "/d/flowers")
    newest = _fake_run(runs, "2024-01-02_10-00-00_flowers", "flowers", "/d/flowers")
    _fake_run(runs, "2024-01-03_10-00-00_flowers", "flowers", "/d/flowers", finished=True)
    _fake_run(runs, "2024-01-04_10-00-00_flowers", "flowers", "/elsewhere/flowers")
    _fake_run(runs, "2024-01-05_10-00-00_digits", "digits", "data/digits")
    for i, run in enumerate((old, newest)):
        os.utime(run / "last.pt", (1000 + i, 1000 + i))
    cfg = compose_cfg(["dataset=folder", "dataset.name=flowers", "dataset.root=/d/flowers", "trainer.resume=auto"])
    found = resume.find_run_to_resume(cfg.trainer.resume, output_dir=cfg.output_dir, dataset=cfg.dataset)
    assert found.resolve() == newest.resolve()
    cfg = compose_cfg(["dataset=folder", "dataset.name=flowers", "dataset.root=/d/other", "trainer.resume=auto"])
    assert resume.find_run_to_resume(cfg.trainer.resume, output_dir=cfg.output_dir, dataset=cfg.dataset) is None


def test_resume_path_without_last_is_a_one_line_error(tmp_path):
    cfg = compose_cfg([f"trainer.resume={tmp_path}"])
    with pytest.raises(MissingFileError, match=f"no last.pt in {tmp_path}.*trainer.resume=auto"):
        resume.prepare_resume(cfg)
