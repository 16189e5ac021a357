"""Weight averaging (`trainer.ema`): an exponential moving average of the fine-tuned weights, timm's ModelEmaV3.

The fit updates it after every optimizer step that was not skipped, from the unwrapped model (never the DDP
wrapper: every rank holds the same weights, so every rank keeps the same average), evaluates it on val beside
the raw weights each epoch, and saves `best` from whichever of the two is better on `trainer.monitor`.

ModelEmaV3 averages every floating-point entry of the state dict (parameters and BatchNorm running stats alike)
and copies the integer ones (`num_batches_tracked`), so the averaged BN statistics match the averaged weights.
Its warmup (`use_warmup`) lowers the decay early on: decay(k) = min(trainer.ema_decay, 1 - k^-3/4) at update k
(k = 1 copies the weights). Without it a 0.999 average of a few dozen steps would still be ~97% the
initial weights; with it the average follows training (decay 0.89 at step 20, 0.99 at ~460, 0.999 at ~10K).
Power 3/4 is timm's advice for runs of under a million steps (2/3 is for longer ones).
"""
from __future__ import annotations

import math

import torch
from timm.utils import ModelEmaV3

WARMUP_POWER = 3 / 4


class WeightAverage:
    """The EMA copy of a model (one extra copy of the weights, on the model's device) and its update count."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=WARMUP_POWER)
        self.ema.module.requires_grad_(False)  # never trained: no gradients, no optimizer state
        # a `trainer.compile` model: the copy drops the compiled forward (nn.Module.__getstate__), so the EMA
        # evaluates eagerly once per epoch instead of compiling a second graph
        self.updates = 0

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model: same class and state-dict keys as the model it tracks (evaluate/save it as is)."""
        return self.ema.module

    def update(self, model: torch.nn.Module) -> None:
        """Fold in `model`'s current weights (the unwrapped model, after an optimizer step)."""
        self.updates += 1
        self.ema.update(model, step=self.updates)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def ema_wins(ema_value: float, raw_value: float, mode: str) -> bool:
    """True when the EMA weights are strictly better on the monitor (`mode` max/min); a tie keeps the raw weights.
    NaN never wins over a number."""
    if math.isnan(ema_value):
        return False
    if math.isnan(raw_value):
        return True
    return ema_value > raw_value if mode == "max" else ema_value < raw_value


def record(history: list[dict], best_epoch: int, monitor: str, mode: str, decay: float) -> dict:
    """metrics.json's `weight_averaging`: which weights `best` holds and both candidates' monitor at its epoch."""
    row = history[best_epoch - 1] if best_epoch else {}
    raw, ema = row.get(f"val_{monitor}", float("nan")), row.get(f"ema_val_{monitor}", float("nan"))
    chosen = ("ema" if ema_wins(ema, raw, mode) else "raw") if best_epoch else "probe (no epoch beat auto's probe)"
    return {"kind": "ema", "decay": decay, "warmup_power": WARMUP_POWER, "monitor": monitor, "chosen": chosen,
            "best_epoch": best_epoch, "val_raw": raw, "val_ema": ema}
