"""`trainer.time_limit`: a wall-clock budget for the fine-tune fit (training/fit.py) instead of an epoch count.

The run measures its own speed: the first PROBE_STEPS train steps of its first epoch (data loading included) give
a provisional plan; that epoch in full, its val evaluation and its checkpoint writes give the plan, and the second
epoch, the first with everything warm (model, allocator, loader), remakes it (MEASURED_EPOCHS; a resumed session
measures its own first two). Epoch 1 ran 1.3-1.9x slower than the next ones, so a plan from it alone left up to a
quarter of a 2-minute budget unused (chest_xray: 4 epochs in 88 s of 120). In the plan's first half a later,
faster epoch re-plans upward (REPLAN_GAIN; epoch 2 is not always warm). A plan counts
the time spent since the run started (data listing, audit, model build; on resume also the time saved in
last.pt) and keeps time for the work after the loop: the test evaluation (the measured val evaluation x the
test/val image ratio) and the reports (RESERVE_S). `trainer.epochs` is the upper bound (null, the default:
UNCAPPED_MAX_EPOCHS); at least 1 epoch runs.
Should steps run slower than planned, the epoch ends before the step that would eat into the kept time.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

from pipeline.config.checks import parse_duration
from pipeline.config.schema import TrainerConfig
from pipeline.runtime import distributed

PROBE_STEPS = 5  # train steps measured before the provisional plan
MEASURED_EPOCHS = 2  # epochs of a session whose speed (re)makes the plan: the first, then the first warm one
REPLAN_GAIN = 2  # later epochs re-plan (upward, in the plan's first half) when their speed adds this many epochs
RESERVE_S = 5.0  # kept for the reports (plots, galleries, summary) after the loop
UNCAPPED_MAX_EPOCHS = 100  # trainer.epochs=null: the most epochs a plan may use (digits, 2 minutes: 16-19)
EVAL_PER_TRAIN = 0.5  # until measured: a val image's time as a share of a train image's (forward only)


def now() -> float:
    """The budget's clock (tests replace it)."""
    return time.perf_counter()


@dataclass
class Speed:
    """Seconds per train step (data loading included), per val evaluation, per epoch's checkpoint writes, and
    an epoch's first step beyond a step (loader workers starting, warm-up)."""
    step_s: float
    eval_s: float
    checkpoint_s: float
    overhead_s: float = 0.0

    def epoch_s(self, steps: int) -> float:
        return self.overhead_s + steps * self.step_s + self.eval_s + self.checkpoint_s

    def step_and_save_s(self) -> float:
        """One more step, then the epoch's evaluation and checkpoints."""
        return self.step_s + self.eval_s + self.checkpoint_s


def plan_epochs(*, limit_s: float, spent_s: float, steps_per_epoch: int, speed: Speed, final_s: float,
                max_epochs: int, done_epochs: int = 0) -> int:
    """Epochs in all (`done_epochs` included) whose steps, val evaluations and checkpoints fit in `limit_s`
    from `spent_s` on, keeping `final_s` + RESERVE_S for the work after the loop. At least 1 (and the epochs
    done), at most `max_epochs`."""
    left = limit_s - spent_s - final_s - RESERVE_S
    more = math.floor(left / max(speed.epoch_s(steps_per_epoch), 1e-9)) if left > 0 else 0
    return max(1, done_epochs, min(max_epochs, done_epochs + more))


def partial_stats(partial: dict) -> dict:
    """Train stats of an epoch ended early (train_one_epoch's `partial` counters), as a full epoch reports them."""
    seen, seconds = partial["seen"], partial["seconds"]
    return {"train_loss": partial["loss_sum"] / seen if seen else float("nan"), "train_images": seen,
            "train_seconds": seconds, "train_img_per_s": seen / max(seconds, 1e-9),
            "nonfinite_steps": partial["nonfinite_steps"]}


@dataclass(frozen=True)
class Workload:
    """What the budget plans: train steps per epoch and images per step, the images of a val evaluation (each
    epoch) and of the test evaluation (after the loop)."""
    steps_per_epoch: int
    images_per_step: int
    val_images: int
    test_images: int


class TimeBudget:
    """One run's budget. The fit calls `can_start_epoch`, `start_epoch`, `after_step` (after every train step:
    True = end the epoch before the next), `measuring` around the val evaluation and the checkpoint writes, and
    `end_epoch`; `on_plan(epochs)` hears every (re)plan (the LR schedule spans the planned steps)."""

    def __init__(self, limit: str, work: Workload, *, started: float, max_epochs: int,
                 on_plan: Callable[[int], None] = lambda epochs: None, clock: Callable[[], float] | None = None):
        self.limit, self.limit_s = limit, parse_duration("trainer.time_limit", limit)
        self.clock, self.started, self.offset = clock or now, started, 0.0  # offset: earlier sessions (resume)
        self.steps_per_epoch, self.max_epochs, self.on_plan = work.steps_per_epoch, max_epochs, on_plan
        self.val_steps = work.val_images / max(work.images_per_step, 1)  # in train batches: the first eval estimate
        self.test_ratio = work.test_images / max(work.val_images, 1)
        self.speed: Speed | None = None
        self.measured: dict = {}
        self.planned = self.provisional = self.spent_before_training = self.loop_end_s = None
        self.plans: list[dict] = []  # every plan made after an epoch: {"after_epoch", "epochs"}
        self.epochs_run, self.stopped, self.stopped_at = 0, None, None
        self._measured_epochs, self._timed = 0, {}  # this session's; this epoch's eval/checkpoint seconds
        self._epoch, self._t0, self._steps, self._done, self._first_step, self._last_step = 0, 0.0, 0, 0, 0.0, 0.0

    def elapsed(self) -> float:
        return self.offset + self.clock() - self.started

    def _step_s(self) -> float:
        """Seconds per step after the first in this epoch (the first alone when there is only one)."""
        if self._steps < 2:
            return self._first_step - self._t0
        return (self._last_step - self._first_step) / (self._steps - 1)

    def _estimate(self) -> Speed:
        """The measured speed, else this epoch's so far."""
        return self.speed if self.speed is not None else self._this_epoch()

    def _this_epoch(self) -> Speed:
        """This epoch's speed so far (eval before it is timed: EVAL_PER_TRAIN of the val images' train time)."""
        step_s = self._step_s()
        timed = {"eval_s": self.val_steps * step_s * EVAL_PER_TRAIN, "checkpoint_s": 0.0, **self.measured,
                 **self._timed}  # this epoch's timings, else an earlier epoch's, else the guesses
        return Speed(step_s, timed["eval_s"], timed["checkpoint_s"], max(0.0, self._first_step - self._t0 - step_s))

    def _kept(self, speed: Speed) -> float:
        """Seconds kept for after the loop: the test evaluation and the reports."""
        return speed.eval_s * self.test_ratio + RESERVE_S

    def replan(self, speed: Speed, spent_s: float, done_epochs: int) -> int:
        """Plan (DDP: rank 0's plan, so every rank runs the same epochs and LR schedule) and tell `on_plan`."""
        self.planned = distributed.from_main(lambda: plan_epochs(
            limit_s=self.limit_s, spent_s=spent_s, steps_per_epoch=self.steps_per_epoch, speed=speed,
            final_s=speed.eval_s * self.test_ratio, max_epochs=self.max_epochs, done_epochs=done_epochs))
        self.on_plan(self.planned)
        return self.planned

    def can_start_epoch(self, epoch: int) -> bool:
        """False past the plan, or when one step, an evaluation and a checkpoint no longer fit (epoch 1 always runs)."""
        if self.planned is not None and epoch > self.planned:
            self.stopped = "planned_epochs"
        elif epoch > 1 and self.speed is not None and distributed.any_true(
                self.elapsed() + self.speed.epoch_s(1) > self.limit_s - self._kept(self.speed)):
            self.stopped, self.stopped_at = "time_limit", f"before epoch {epoch}"
        return self.stopped is None

    def start_epoch(self, epoch: int, done_steps: int = 0) -> None:
        """`done_steps`: steps of this epoch trained before a resume."""
        self._epoch, self._t0, self._steps, self._done, self._timed = epoch, self.elapsed(), 0, done_steps, {}
        if self.spent_before_training is None:
            self.spent_before_training = self._t0

    def after_step(self) -> bool:
        """Count a step (the first epoch measures, and plans after PROBE_STEPS); True when the next step would
        leave too little time to evaluate this epoch, save it and do the work after the loop."""
        self._steps += 1
        t = self._last_step = self.elapsed()
        if self._steps == 1:
            self._first_step = t
        speed, left_in_epoch = self._estimate(), self.steps_per_epoch - self._done - self._steps
        # before a speed is measured, one step alone says nothing: the first carries the warm-up (digits: 3.9 s
        # against 1.2 s for the next ones, which ended a 1-minute epoch after one step)
        known = self.speed is not None or self._steps >= 2
        over = left_in_epoch > 0 and known and distributed.any_true(
            t + speed.step_and_save_s() > self.limit_s - self._kept(speed))
        if self.speed is None and self.provisional is None and (self._steps == PROBE_STEPS or left_in_epoch <= 0
                                                                or over):
            self.provisional = self.replan(speed, self._t0, self._epoch - 1)
        if over:
            self.stopped = "time_limit"
            self.stopped_at = f"step {self._done + self._steps} of {self.steps_per_epoch}, epoch {self._epoch}"
            return True
        return False

    def time_for_eval(self) -> bool:
        """Whether the epoch cut short can still be evaluated and saved before the kept time."""
        speed = self._estimate()
        return distributed.any_true(self.elapsed() + speed.eval_s + speed.checkpoint_s
                                    <= self.limit_s - self._kept(speed))

    @contextmanager
    def measuring(self, kind: str) -> Iterator[None]:
        """Time the block as `kind` ("eval", "checkpoint"), summed over the epoch (best + last checkpoint)."""
        begin = self.clock()
        yield
        self._timed[f"{kind}_s"] = self._timed.get(f"{kind}_s", 0.0) + self.clock() - begin

    def end_epoch(self, stats: dict) -> None:
        """After the epoch's evaluation and checkpoints: the session's first MEASURED_EPOCHS epochs (re)make the
        plan from their own speed, for the time left now. Later, in the plan's first half, an epoch fast enough to
        add REPLAN_GAIN epochs or more replaces the speed and re-plans upward (a slower one is left to the stop
        within the epoch): epoch 2 is not always warm (chest_xray partial, 5 minutes: 10.4 s of training
        against about 8 s in epochs 3-24, which left 63 s of the 300 unused)."""
        self.epochs_run += 1
        if not self._steps:
            return
        speed = self._this_epoch()
        if self._measured_epochs < MEASURED_EPOCHS:
            self._measured_epochs += 1
        elif not (self._done + self._steps == self.steps_per_epoch and 2 * self._epoch <= (self.planned or 0)
                  and distributed.from_main(lambda: self._plan(speed)) >= self.planned + REPLAN_GAIN):
            return
        self.speed = speed
        self.measured.update(step_s=speed.step_s, overhead_s=speed.overhead_s, eval_s=speed.eval_s,
                             checkpoint_s=speed.checkpoint_s, train_img_per_s=stats["train_img_per_s"],
                             from_epoch=self._epoch)
        self.replan(speed, self.elapsed(), self._epoch)
        self.plans.append({"after_epoch": self._epoch, "epochs": self.planned})

    def _plan(self, speed: Speed) -> int:
        """Epochs in all that fit from now at `speed`, this epoch done."""
        return plan_epochs(limit_s=self.limit_s, spent_s=self.elapsed(), steps_per_epoch=self.steps_per_epoch,
                           speed=speed, final_s=speed.eval_s * self.test_ratio, max_epochs=self.max_epochs,
                           done_epochs=self._epoch)

    def end_loop(self) -> None:
        self.stopped = self.stopped or "planned_epochs"
        self.loop_end_s = self.elapsed()

    def state_dict(self) -> dict:
        """For last.pt: the time spent so far (a resume counts it) and what was measured and planned."""
        return {"elapsed_s": self.elapsed(), "speed": asdict(self.speed) if self.speed else None,
                "measured": self.measured, "provisional": self.provisional, "planned": self.planned,
                "spent_before_training": self.spent_before_training}

    def load_state_dict(self, state: dict | None, done_epochs: int) -> None:
        """Continue a saved budget: its time counts as spent; with a measured speed, plan what is left."""
        if not state:
            return
        self.offset = state["elapsed_s"]  # this session's own time since `started` adds to it
        self.speed = Speed(**state["speed"]) if state["speed"] else None
        self.measured, self.provisional, self.planned = dict(state["measured"]), state["provisional"], state["planned"]
        self.spent_before_training, self.epochs_run = state["spent_before_training"], done_epochs
        if self.speed is not None:
            self.replan(self.speed, self.elapsed(), done_epochs)

    def report(self) -> dict:
        """metrics.json `budget`: the plan, the measured speed and where the time went (seconds)."""
        speed, total = self._estimate(), self.elapsed()
        return {"limit": self.limit, "limit_s": self.limit_s, "max_epochs": self.max_epochs,
                "steps_per_epoch": self.steps_per_epoch, "provisional_epochs": self.provisional,
                "planned_epochs": self.planned, "plans": self.plans, "epochs_run": self.epochs_run,
                "stopped": self.stopped, "stopped_at": self.stopped_at,
                "measured": {"train_img_per_s": self.measured.get("train_img_per_s"),
                             "s_per_step": self.measured.get("step_s"), "eval_s": self.measured.get("eval_s"),
                             "checkpoint_s": self.measured.get("checkpoint_s"),
                             "epoch_overhead_s": self.measured.get("overhead_s"),
                             "from_epoch": self.measured.get("from_epoch")},
                "kept_for_after_loop_s": self._kept(speed), "spent_before_training_s": self.spent_before_training,
                "loop_end_s": self.loop_end_s, "after_loop_s": total - (self.loop_end_s or total), "total_s": total}


def measure(budget: TimeBudget | None, kind: str):
    """`budget.measuring(kind)`, or nothing without a budget."""
    return budget.measuring(kind) if budget is not None else nullcontext()


def max_epochs(epochs: int | None) -> int:
    """The fit's most epochs: `trainer.epochs`, or UNCAPPED_MAX_EPOCHS when it is null (the time limit plans)."""
    return epochs if epochs is not None else UNCAPPED_MAX_EPOCHS


def from_config(trainer: TrainerConfig, *, started: float | None, steps_per_epoch: int, val_images: int,
                test_images: int, on_plan: Callable[[int], None]) -> TimeBudget | None:
    """The run's budget from `trainer.*`, or None without `trainer.time_limit`."""
    if trainer.time_limit is None:
        return None
    return TimeBudget(trainer.time_limit, Workload(steps_per_epoch, trainer.batch_size, val_images, test_images),
                      started=now() if started is None else started, max_epochs=max_epochs(trainer.epochs),
                      on_plan=on_plan)
