"""`trainer.time_limit` (training/budget.py): the default budget, the duration parser, the plan from measured
speed, the LR schedule over the planned steps, a clean stop at the limit and a resume within what is left of it.

Time is virtual: a fake clock (`budget.now`) that only the tests move, by a fixed amount per train step."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg, write_tiny_folder
from pipeline.config import check_values
from pipeline.config.checks import parse_duration
from pipeline.errors import ConfigError
from pipeline.model import checkpoint
from pipeline.runtime.devices import build_accel
from pipeline.train import train
from pipeline.budgeted import auto_budget
from pipeline.training import budget, interrupts
from pipeline.training.guard import StepGuard
from pipeline.transfer import optim

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _measure_one_epoch(clock: FakeClock, b: budget.TimeBudget, *, steps: int, step_s: float, eval_s: float,
                       probe: list | None = None, epoch: int = 1) -> None:
    """An epoch as the fit drives it: `steps` train steps of `step_s`, an evaluation of `eval_s`, a 0 s save."""
    b.start_epoch(epoch)
    for i in range(steps):
        clock.t += step_s
        assert not b.after_step()
        if probe is not None and i + 1 == budget.PROBE_STEPS:
            probe.append(b.provisional)
    with budget.measure(b, "eval"):
        clock.t += eval_s
    with budget.measure(b, "checkpoint"):
        pass
    b.end_epoch({"train_img_per_s": 8 / step_s})


def test_plan_from_measured_speed_counts_the_time_spent_before_training():
    """0.5 s/step, 10 steps/epoch, eval 1 s, limit 60 s, 2 s spent before training: an epoch is 6 s and
    60 - 2 - RESERVE_S (5) = 53 s hold 8 of them; after 5 steps (eval estimated at EVAL_PER_TRAIN of the val
    images' train time: 2 val batches x 0.5 s x 0.5 = 0.5 s) the provisional plan was 53 / 5.5 -> 9."""
    clock, plans, probe = FakeClock(), [], []
    b = budget.TimeBudget("1m", budget.Workload(steps_per_epoch=10, images_per_step=8, val_images=16, test_images=0),
                          started=0.0, max_epochs=50, on_plan=plans.append, clock=clock)
    clock.t = 2.0  # data listing, audit, model build
    _measure_one_epoch(clock, b, steps=10, step_s=0.5, eval_s=1.0, probe=probe)
    assert probe == [9] and b.planned == 8 and plans == [9, 8]
    assert b.speed == budget.Speed(step_s=0.5, eval_s=1.0, checkpoint_s=0.0, overhead_s=0.0)
    assert b.report()["measured"] == {"train_img_per_s": 16.0, "s_per_step": 0.5, "eval_s": 1.0, "checkpoint_s": 0.0,
                                      "epoch_overhead_s": 0.0, "from_epoch": 1}
    speed = budget.Speed(step_s=0.5, eval_s=1.0, checkpoint_s=0.0)
    plan = {"limit_s": 60.0, "steps_per_epoch": 10, "speed": speed, "max_epochs": 50}
    assert budget.plan_epochs(spent_s=14.0, final_s=0.0, **plan) == 6  # more spent: fewer epochs
    assert budget.plan_epochs(spent_s=2.0, final_s=6.0, **plan) == 7  # test evaluation kept for: fewer epochs
    assert budget.plan_epochs(spent_s=2.0, final_s=0.0, **{**plan, "max_epochs": 3}) == 3  # trainer.epochs caps
    assert budget.plan_epochs(spent_s=59.0, final_s=0.0, **plan) == 1  # at least one epoch


def test_a_timed_train_step_leaves_no_gradients_and_times_a_forward():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    model(images)  # materialise the lazy layer
    accel = build_accel(torch.device("cpu"), amp="off", channels_last=True)
    timing = auto_budget.time_train_step(model, images, labels, accel)
    assert timing["step_s"] > 0 and timing["forward_s"] > 0 and timing["batch"] == 4
    assert all(p.grad is None for p in model.parameters())


def test_the_first_warm_epoch_remakes_the_plan():
    """Epoch 1 is cold (1 s/step: warm-up, loader start), epoch 2 warm (0.5 s/step). Limit 60 s, 10 steps and a 1 s
    eval per epoch: epoch 1's plan is (60 - 5) / 11 -> 5 epochs; from epoch 2's start (t = 11 s) the warm speed
    fits 1 + (60 - 11 - 5) / 6 -> 8, and the schedule re-spans to it. Epoch 3 no longer re-plans."""
    clock, plans = FakeClock(), []
    b = budget.TimeBudget("1m", budget.Workload(steps_per_epoch=10, images_per_step=8, val_images=16, test_images=0),
                          started=0.0, max_epochs=50, on_plan=plans.append, clock=clock)
    _measure_one_epoch(clock, b, steps=10, step_s=1.0, eval_s=1.0)
    assert b.planned == 5
    _measure_one_epoch(clock, b, steps=10, step_s=0.5, eval_s=1.0, epoch=2)
    assert b.planned == 8 and plans[-1] == 8 and b.speed.step_s == 0.5
    assert b.report()["measured"]["from_epoch"] == 2
    _measure_one_epoch(clock, b, steps=10, step_s=0.4, eval_s=1.0, epoch=3)
    assert b.planned == 8 and b.speed.step_s == 0.5 and len(plans) == 3  # provisional, epoch 1, epoch 2


def test_a_later_faster_epoch_re_plans_upward_in_the_plans_first_half():
    """Limit 120 s, 10 steps and a 1 s eval per epoch. Epochs 1-2 at 1 s/step plan 10 epochs. Epoch 3 at 0.5 s/step
    (t = 28 s) fits 3 + (120 - 28 - 5) / 6 -> 17 (>= 10 + REPLAN_GAIN): the plan and the schedule grow. A slower
    epoch 4 does not shrink it (the stop within an epoch guards the limit), and in the plan's second half even a
    much faster epoch 9 leaves it (re-spanning the schedule there would raise an annealed LR)."""
    clock, plans = FakeClock(), []
    b = budget.TimeBudget("2m", budget.Workload(steps_per_epoch=10, images_per_step=8, val_images=16, test_images=0),
                          started=0.0, max_epochs=100, on_plan=plans.append, clock=clock)
    for epoch in (1, 2):
        _measure_one_epoch(clock, b, steps=10, step_s=1.0, eval_s=1.0, epoch=epoch)
    assert b.planned == 10
    _measure_one_epoch(clock, b, steps=10, step_s=0.5, eval_s=1.0, epoch=3)
    assert b.planned == 17 and plans[-1] == 17 and b.report()["plans"][-1] == {"after_epoch": 3, "epochs": 17}
    _measure_one_epoch(clock, b, steps=10, step_s=1.0, eval_s=1.0, epoch=4)
    assert b.planned == 17 and b.speed.step_s == 0.5
    for epoch in range(5, 10):
        _measure_one_epoch(clock, b, steps=10, step_s=0.5 if epoch < 9 else 0.2, eval_s=1.0, epoch=epoch)
    assert b.planned == 17 and [p["after_epoch"] for p in b.report()["plans"]] == [1, 2, 3]


def test_a_slow_first_step_alone_does_not_end_the_first_epoch():
    """The first step carries the warm-up (20 s here, then 1 s): judged alone it would leave no time (20 s + a 20 s
    eval estimate > 60 - 5 s kept), so the epoch goes on; from step 2 the speed is that of the steps after it."""
    clock = FakeClock()
    b = budget.TimeBudget("1m", budget.Workload(steps_per_epoch=10, images_per_step=8, val_images=32, test_images=0),
                          started=0.0, max_epochs=50, clock=clock)
    b.start_epoch(1)
    for step_s in (20.0, 1.0, 1.0):
        clock.t += step_s
        assert not b.after_step()
    assert b.stopped is None


@pytest.mark.parametrize("text, seconds", [("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0), ("0.5s", 0.5)])
def test_duration_parser_reads_number_and_unit(text, seconds):
    assert parse_duration("trainer.time_limit", text) == seconds
    check_values(compose_cfg([f"trainer.time_limit={text}"]))


@pytest.mark.parametrize("override", ["90", "10min", "-5s", "0s", "1e3s", "1.5.h", "h", "'10 m'", "true"])
def test_a_bad_duration_is_a_one_line_error_at_start_up(override):
    with pytest.raises(ConfigError) as err:
        check_values(compose_cfg([f"trainer.time_limit={override}"]))
    message = str(err.value)
    assert message.startswith("trainer.time_limit=") and "is not a duration" in message and "\n" not in message
    check_values(compose_cfg(["trainer.time_limit=null", "trainer.epochs=5"]))  # no limit: the epoch count


def test_the_default_is_a_time_limit_and_an_epoch_count_alone_trains_that_count():
    default = compose_cfg([])
    assert default.trainer.epochs is None and parse_duration("trainer.time_limit", default.trainer.time_limit) == 120
    counted = compose_cfg(["trainer.epochs=7"])  # as before the budget default: 7 epochs, no limit
    assert counted.trainer.time_limit is None and counted.features.head_epochs == 7
    both = compose_cfg(["trainer.epochs=7", "trainer.time_limit=5m"])  # at most 7 epochs within 5 minutes
    assert (both.trainer.epochs, both.trainer.time_limit) == (7, "5m")
    assert compose_cfg(["trainer.time_limit=10m"]).features.head_epochs == 5  # the cached linear head's own count
    with pytest.raises(ConfigError) as err:
        check_values(compose_cfg(["trainer.time_limit=null"]))
    assert str(err.value).startswith("trainer.epochs and trainer.time_limit are both null")


def test_the_schedule_spans_the_planned_steps():
    """Built over the upper bound (trainer.epochs), re-spanned to the plan: cosine reaches ~0 at the last planned
    step; warmup is unchanged and the span survives a state_dict round trip (last.pt)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = optim.build_scheduler(opt, name="cosine", total_steps=100, warmup_steps=4)
    assert sched.get_last_lr() == [pytest.approx(0.25)]  # warmup step 1 of 4
    sched.set_total_steps(24)
    for _ in range(23):
        sched.step()
    assert 0 < sched.get_last_lr()[0] < 0.01  # one step before the end
    again = optim.build_scheduler(torch.optim.SGD(model.parameters(), lr=1.0), name="cosine", total_steps=100,
                                  warmup_steps=4)
    again.load_state_dict(sched.state_dict())
    sched.step()
    again.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12) and again.get_last_lr() == sched.get_last_lr()


def _cfg(out: Path, data: Path, *extra: str):
    return compose_cfg([f"output_dir={out}", f"data_dir={out.parent / 'cache'}", f"dataset.root={data}",
                        f"backbone.cache_dir={ROOT / 'data/weights'}", "trainer=smoke", "dataset=folder",
                        "backbone=tiny", "backbone.input_size=32", "strategy=finetune", "trainer.epochs=10",
                        "trainer.tensorboard=false", "trainer.top_losses=0", *extra])


@pytest.fixture
def virtual_time(monkeypatch):
    """budget.now() reads a fake clock that advances only per train step: `seconds(step)` for step 1, 2, ..."""
    clock, steps, original = FakeClock(), [], StepGuard.grads_ok

    def grads_ok_then_tick(self, *args):
        steps.append(1)
        clock.t += clock.seconds(len(steps))
        return original(self, *args)

    clock.seconds = lambda step: 1.0
    monkeypatch.setattr(budget, "now", clock)
    monkeypatch.setattr(StepGuard, "grads_ok", grads_ok_then_tick)
    return clock


def test_steps_slower_than_planned_end_the_epoch_at_the_limit(tmp_path, virtual_time):
    """3 steps of 1 s, eval and saves 0 s: (12 s - RESERVE_S) / 3 s plans 2 epochs. From step 4 on a step takes
    2 s: after step 5 (t = 7 s) one more step would eat into the 5 s kept, so epoch 2 ends at step 2 of 3, is
    evaluated (there is time) and the run finishes normally with a loadable best checkpoint; its re-plan keeps the
    2 epochs run."""
    virtual_time.seconds = lambda step: 1.0 if step <= 3 else 2.0
    data = write_tiny_folder(tmp_path / "data")
    metrics = train(_cfg(tmp_path / "run", data, "trainer.max_train_batches=3", "trainer.time_limit=12s"))
    b = metrics["budget"]
    assert metrics["status"] == "ok" and b["planned_epochs"] == 2 and b["epochs_run"] == 2
    assert b["stopped"] == "time_limit" and b["stopped_at"] == "step 2 of 3, epoch 2"
    assert [h["train_images"] for h in metrics["history"]] == [24, 16]  # the cut epoch: 2 batches of 8
    assert b["loop_end_s"] == 7.0 and b["spent_before_training_s"] == 0.0
    assert b["measured"]["s_per_step"] == 2.0 and b["measured"]["from_epoch"] == 2  # the second epoch re-measured
    run = Path(metrics["run_dir"])
    _, meta = checkpoint.load_checkpoint(run, "best")
    assert meta["epoch"] == metrics["best_epoch"] and not (run / "last.pt").exists()
    assert json.loads((run / "metrics.json").read_text())["budget"]["stopped"] == "time_limit"
    assert "## Time budget" in (run / "summary.md").read_text()


def test_without_an_epoch_count_the_default_budget_plans_the_epochs(tmp_path, virtual_time, monkeypatch):
    """trainer.epochs=null under the default limit (2m): 2 steps of 10 s per epoch plan 2 + (120 - 40 - 5) // 20
    = 5 epochs, all run, the last annealed. With 1 s steps the plan stops at UNCAPPED_MAX_EPOCHS (3 here)."""
    virtual_time.seconds = lambda step: 10.0
    data = write_tiny_folder(tmp_path / "data")
    metrics = train(_cfg(tmp_path / "run", data, "trainer.max_train_batches=2", "trainer.epochs=null"))
    b = metrics["budget"]
    assert b["limit"] == "2m" and b["max_epochs"] == budget.UNCAPPED_MAX_EPOCHS
    assert b["planned_epochs"] == 5 and len(metrics["history"]) == 5 and b["stopped"] == "planned_epochs"
    assert metrics["history"][-1]["lr_head"] == pytest.approx(0.0, abs=1e-12)

    virtual_time.seconds = lambda step: 1.0
    monkeypatch.setattr(budget, "UNCAPPED_MAX_EPOCHS", 3)
    metrics = train(_cfg(tmp_path / "capped", data, "trainer.max_train_batches=2", "trainer.epochs=null"))
    assert metrics["budget"]["planned_epochs"] == 3 and len(metrics["history"]) == 3


def test_resume_continues_within_what_is_left_of_the_budget(tmp_path, virtual_time, monkeypatch):
    """2 steps of 1 s per epoch, limit 13 s: (13 - 5) / 2 plans 4 epochs. SIGINT in step 3 (t = 3 s) saves the
    time spent. The resumed session measures its own first epoch (the 1 step left of epoch 2, ending at t = 4 s)
    and plans 2 + (13 - 4 - 5) // 2 = 4 epochs (5 if the spent time were lost); its schedule anneals to 0 at the
    last of them."""
    data, run = write_tiny_folder(tmp_path / "data"), tmp_path / "run"
    original = StepGuard.grads_ok

    def sigint_in_step_3(self, *args):
        if virtual_time.t == 2.0:  # ticked before this call: the 3rd step
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args)

    monkeypatch.setattr(StepGuard, "grads_ok", sigint_in_step_3)
    with pytest.raises(interrupts.TrainingInterrupted):
        train(_cfg(run, data, "trainer.max_train_batches=2", "trainer.time_limit=13s"))
    saved = checkpoint.load_state(run / "last.pt")["budget"]
    assert saved["planned"] == 4 and saved["elapsed_s"] == 3.0 and saved["speed"]["step_s"] == 1.0

    monkeypatch.setattr(StepGuard, "grads_ok", original)  # the virtual_time ticking underneath stays
    metrics = train(_cfg(run, data, "trainer.resume=auto"))
    b = metrics["budget"]
    assert metrics["resumed_from_epoch"] == 1 and b["planned_epochs"] == 4 and len(metrics["history"]) == 4
    assert b["stopped"] == "planned_epochs" and re.fullmatch(r"\d+s", b["limit"])
    assert metrics["history"][-1]["lr_head"] == pytest.approx(0.0, abs=1e-12)
