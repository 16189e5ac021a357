"""`trainer.ema` (training/averaging.py, training/fit.py): the weight average follows training with timm's warmup,
`best` holds whichever of raw/EMA won on val (best.json `weights_source`, metrics.json `weight_averaging`), a
SIGINT + resume continues the same average, and with `trainer.ema=false` nothing of it appears."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import compose_cfg, write_tiny_folder
from pipeline.model import checkpoint
from pipeline.train import train
from pipeline.training import averaging, interrupts, loop, resume

ROOT = Path(__file__).resolve().parents[2]
RUN = ("dataset=folder", "backbone=tiny", "backbone.input_size=64", "strategy=finetune", "trainer.keep_last=true")
TIMING = {"train_seconds", "train_img_per_s"}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_the_average_follows_every_step_with_warmup_and_averages_bn_stats():
    """After 20 SGD steps the EMA is exactly the warmup-decay average of the 20 raw states (BN running stats
    included, the step counter copied): neither the initial nor the raw weights."""
    model = _net()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    avg = averaging.WeightAverage(model, decay=0.999)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {k: v.clone() for k, v in init.items()}
    for k in range(1, 21):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 3, 8, 8)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
        avg.update(model)
        decay = min(0.999, 1 - k ** -averaging.WARMUP_POWER)  # k = 1: a copy
        for name, v in model.state_dict().items():
            expected[name] = expected[name] * decay + v * (1 - decay) if v.is_floating_point() else v.clone()
    ema, raw = avg.module.state_dict(), model.state_dict()
    assert avg.updates == 20 and not any(p.requires_grad for p in avg.module.parameters())
    assert int(ema["1.num_batches_tracked"]) == int(raw["1.num_batches_tracked"]) == 20
    for name in ("0.weight", "1.weight", "1.running_mean", "1.running_var", "5.weight", "5.bias"):
        torch.testing.assert_close(ema[name], expected[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ema[name], raw[name]) and not torch.allclose(ema[name], init[name]), name

    again = averaging.WeightAverage(_net(), decay=0.999)  # last.pt round trip: weights and counter
    again.load_state_dict(avg.state_dict())
    assert again.updates == 20 and all(torch.equal(again.module.state_dict()[k], v) for k, v in ema.items())


def test_ema_wins_only_when_strictly_better_and_never_with_nan():
    assert averaging.ema_wins(0.8, 0.7, "max") and not averaging.ema_wins(0.7, 0.7, "max")
    assert averaging.ema_wins(0.2, 0.3, "min") and not averaging.ema_wins(0.3, 0.2, "min")
    assert averaging.ema_wins(0.1, math.nan, "max") and not averaging.ema_wins(math.nan, 0.1, "min")


def _record_last_states(monkeypatch) -> list[dict]:
    """Every last.pt state the fit writes (one per epoch here): the raw and the EMA weights at that epoch's end."""
    states, real = [], resume.save_state

    def keep(run_dir, state):
        states.append({"model": {k: v.clone() for k, v in state["model"].items()},
                       "ema": {k: v.clone() for k, v in state["ema"]["module"].items()}})
        return real(run_dir, state)

    monkeypatch.setattr(resume, "save_state", keep)
    return states


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("chosen", ["ema", "raw"])
def test_best_holds_the_weights_that_won_on_val(tiny_folder, cfg_factory, monkeypatch, chosen):
    """The raw/EMA comparison forced either way: `best` is that epoch's EMA (or raw) weights, bit for bit, and
    best.json, metrics.json (val, weight_averaging), history and summary.md say so."""
    monkeypatch.setattr(averaging, "ema_wins", lambda ema, raw, mode: chosen == "ema")
    states = _record_last_states(monkeypatch)
    cfg = cfg_factory(*RUN, f"dataset.root={tiny_folder}", "trainer.epochs=2", "trainer.max_train_batches=0",
                      "trainer.ema=true", "trainer.ema_decay=0.99")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    best_epoch, monitor = metrics["best_epoch"], cfg.trainer.monitor
    info = json.loads((run / "metrics.json").read_text())["weight_averaging"]
    assert info == metrics["weight_averaging"]
    assert info["kind"] == "ema" and info["chosen"] == chosen and info["best_epoch"] == best_epoch
    assert info["decay"] == 0.99 and info["monitor"] == monitor

    for row in metrics["history"]:  # every val metric also for the EMA
        assert {f"ema_{k}" for k in row if k.startswith("val_")} == {k for k in row if k.startswith("ema_val_")}
    row = metrics["history"][best_epoch - 1]
    prefix = "ema_val_" if chosen == "ema" else "val_"
    assert (info["val_raw"], info["val_ema"]) == (row[f"val_{monitor}"], row[f"ema_val_{monitor}"])
    assert metrics["val"][monitor] == row[prefix + monitor]
    meta = json.loads((run / "best.json").read_text())
    assert meta["weights_source"] == chosen and meta["epoch"] == best_epoch
    assert meta["val_metrics"]["loss"] == row[prefix + "loss"]

    assert len(states) == 2 and _differs(states[1]["ema"], states[0]["ema"])  # the average moved
    at_best, best = states[best_epoch - 1], load_file(run / "best.safetensors")
    other = "model" if chosen == "ema" else "ema"
    assert all(torch.equal(best[k], at_best["ema" if chosen == "ema" else "model"][k]) for k in best)
    assert _differs(best, at_best[other])
    assert f"`best` holds the **{chosen}** weights" in (run / "summary.md").read_text()


def test_ema_off_adds_nothing(tiny_folder, cfg_factory, monkeypatch):
    """trainer.ema=false: one val evaluation per epoch, no ema_* history keys, no weights_source, no record."""
    descs, real = [], loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: descs.append(k["desc"]) or real(*a, **k))
    cfg = cfg_factory(*RUN, f"dataset.root={tiny_folder}", "trainer.epochs=2")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    assert descs == ["val", "val"]
    assert not [k for row in metrics["history"] for k in row if k.startswith("ema")]
    assert "weights_source" not in json.loads((run / "best.json").read_text())
    assert "weight_averaging" not in json.loads((run / "metrics.json").read_text())
    assert "ema" not in checkpoint.load_state(run / "last.pt")


def _strip(history: list) -> list:
    return [{k: v for k, v in e.items() if k not in TIMING} for e in history]


def test_sigint_mid_epoch_then_resume_continues_the_same_average(tiny_folder, cfg_factory, tmp_path, sigint_at_step):
    """SIGINT at step 2 of epoch 1 saves the average (2 updates) in last.pt; the resumed run ends with the same
    history, EMA weights and counter, and `best`, as an uninterrupted one."""
    common = (*RUN, f"dataset.root={tiny_folder}", "trainer.epochs=2", "trainer.max_train_batches=3",
              "trainer.ema=true")
    ref = train(cfg_factory(*common, f"output_dir={tmp_path / 'ref'}"))

    sigint_at_step.arm(2)
    run = tmp_path / "sigint"
    with pytest.raises(interrupts.TrainingInterrupted):
        train(cfg_factory(*common, f"output_dir={run}"))
    saved = checkpoint.load_state(run / "last.pt")
    assert saved["partial"]["steps"] == 2 and saved["ema"]["updates"] == 2

    sigint_at_step.disarm()
    resumed = train(cfg_factory(*common, f"output_dir={run}", "trainer.resume=auto"))
    assert resumed["resumed_from_epoch"] == 0
    assert _strip(resumed["history"]) == _strip(ref["history"])
    assert resumed["weight_averaging"] == ref["weight_averaging"] and resumed["val"] == ref["val"]
    a, b = (checkpoint.load_state(Path(r["run_dir"]) / "last.pt")["ema"] for r in (resumed, ref))
    assert a["updates"] == b["updates"] == 6
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
    a, b = (load_file(Path(r["run_dir"]) / "best.safetensors") for r in (resumed, ref))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.long
def test_two_processes_keep_the_same_average_as_one_and_only_rank_0_writes(tmp_path, monkeypatch):
    """torchrun (2 CPU processes, gloo) with the DDP test config that equals one process: every rank updates the
    average from the unwrapped model, rank 0 alone writes (the worker's audit hook fails a write by rank 1),
    and the average, its counter and the raw/EMA choice match the one-process run."""
    import subprocess
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "runtime"))
    from test_distributed import EXACT, WORKER

    data = write_tiny_folder(tmp_path / "tiny", val={"blue": 4, "green": 4, "red": 5})
    common = [*EXACT, f"dataset.root={data}", f"backbone.cache_dir={(ROOT / 'data/weights').resolve()}",
              f"data_dir={tmp_path / 'data'}", "trainer.ema=true", "trainer.ema_decay=0.9"]
    single = train(compose_cfg([*common, f"output_dir={tmp_path / 'single'}", "trainer.threads=1"]))
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DDP_TEST_FORBID": str(run)}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(WORKER), *common, f"output_dir={run}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = (checkpoint.load_state(Path(d) / "last.pt")["ema"] for d in (single["run_dir"], run))
    assert a["updates"] == b["updates"] == 6  # 3 global batches of 12 per epoch, 2 epochs
    assert max(float((a["module"][k].float() - b["module"][k].float()).abs().max()) for k in a["module"]) < 1e-5
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["weight_averaging"]["chosen"] == single["weight_averaging"]["chosen"]
    for h1, h2 in zip(single["history"], metrics["history"], strict=True):  # the EMA evaluated over both ranks' shards
        assert h1["ema_val_loss"] == pytest.approx(h2["ema_val_loss"], abs=1e-5)
