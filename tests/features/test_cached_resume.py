"""The cached linear probe stops cleanly on SIGINT (extraction or head training) and resumes to the same head."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import compose_cfg
from pipeline.features import heads
from pipeline.model import checkpoint
from pipeline.train import train
from pipeline.training import interrupts, resume

ROOT = Path(__file__).resolve().parents[2]
RUN = ["trainer=smoke", "dataset=folder", "backbone=tiny", "backbone.input_size=64", "strategy=linear_probe",
       "trainer.epochs=3", "trainer.max_train_batches=0", "optim.lr=0.05"]
TIMING = {"train_seconds", "train_img_per_s"}

# pipeline.train in a child whose 2nd feature extraction (val; train's entry is cached by then) writes a
# marker and waits to be interrupted from outside.
_WAIT_IN_EXTRACTION = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, ".")
from pipeline.features import cache
marker, calls, original = Path(sys.argv[1]), [], cache.extract_features
def extract(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        marker.write_text("ready")
        time.sleep(120)
    return original(*args, **kwargs)
cache.extract_features = extract
from pipeline.train import main
sys.argv = ["train"] + sys.argv[2:]
main()
"""


def _args(base: Path, out: Path, data: Path) -> list[str]:
    return [f"output_dir={out}", f"data_dir={base / 'data'}", f"dataset.root={data}",
            f"backbone.cache_dir={ROOT / 'data/weights'}", *RUN]


def _strip(history: list) -> list:
    return [{k: v for k, v in e.items() if k not in TIMING} for e in history]


def test_sigint_during_extraction_exits_130_and_the_resumed_run_reuses_the_cache(tiny_folder, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    args = [*_args(tmp_path, run, tiny_folder), f"hydra.run.dir={tmp_path / 'hydra'}"]
    with open(tmp_path / "stdout.log", "w") as log:  # the message goes to stderr
        child = subprocess.Popen([sys.executable, "-c", _WAIT_IN_EXTRACTION, str(marker), *args], cwd=ROOT,
                                 stdout=log, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), child.communicate()[1][-2000:]
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"Interrupted by SIGINT during feature extraction (finished splits stay in the "
                                f"feature cache); saved {run / 'last.pt'}. Resume with: ")
    assert last_line.endswith(f"python -m pipeline.train trainer.resume={run.resolve()}")
    assert (run / "last.pt").is_file() and not (run / "metrics.json").exists() and not (run / "best.json").exists()
    assert len(list((tmp_path / "data/cache/features").glob("*.safetensors"))) == 1  # train's entry, whole
    assert not list(tmp_path.rglob("*.tmp"))

    resumed = train(compose_cfg(_args(tmp_path, tmp_path / "ignored", tiny_folder) + [f"trainer.resume={run}"]))
    assert resumed["status"] == "ok" and resumed["run_dir"] == str(run)
    extraction = json.loads((run / "features.json").read_text())["extraction"]
    assert extraction["train"]["hit"] and not extraction["val"]["hit"]
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok" and not (run / "last.pt").exists()


def test_sigint_during_head_training_then_resume_gives_the_uninterrupted_head(tiny_folder, tmp_path, monkeypatch):
    ref = train(compose_cfg(_args(tmp_path, tmp_path / "ref", tiny_folder)))
    epochs, original = [], heads.evaluate_head

    def evaluate_then_sigint(*args, **kwargs):  # a real SIGINT to this process after the 2nd head epoch
        epochs.append(1)
        if len(epochs) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(heads, "evaluate_head", evaluate_then_sigint)
    run, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)
    with pytest.raises(interrupts.TrainingInterrupted) as err:
        train(compose_cfg(_args(tmp_path, run, tiny_folder)))
    assert err.value.code == 130 and signal.getsignal(signal.SIGINT) is handler
    assert str(err.value).startswith("Interrupted by SIGINT during head training;") and "\n" not in str(err.value)
    assert f"trainer.resume={run.resolve()}" in str(err.value)
    assert checkpoint.load_state(run / "last.pt")["kind"] == resume.CACHED and not (run / "metrics.json").exists()

    monkeypatch.setattr(heads, "evaluate_head", original)
    resumed = train(compose_cfg(_args(tmp_path, run, tiny_folder) + ["trainer.resume=auto"]))  # auto: that dir
    assert resumed["status"] == "ok" and resumed["resumed_from_epoch"] == 0
    assert _strip(resumed["history"]) == _strip(ref["history"]) and resumed["val"] == ref["val"]
