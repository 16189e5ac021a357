"""Optimizer stage: parameter groups with differential learning rates, and the LR schedule."""
from __future__ import annotations

import math
from typing import Callable

import torch

from pipeline.errors import ConfigError
from pipeline.model.freezing import head_param_names, layer_groups


def build_param_groups(model: torch.nn.Module, *, lr: float, backbone_lr_mult: float = 0.1,
                       layer_decay: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """One group for the head at `lr`, one per backbone layer group at lr * mult * decay^(distance from top).

    Frozen parameters are left out; 1-D params (norms, biases) get no weight decay.
    """
    named = dict(model.named_parameters())
    groups_by_depth = layer_groups(model)
    blocks = [("head", head_param_names(model), lr)]
    for i, names in enumerate(groups_by_depth):
        distance = len(groups_by_depth) - 1 - i
        blocks.append((f"group{i}", names, lr * backbone_lr_mult * layer_decay ** distance))
    out = []
    for name, names, group_lr in blocks:
        params = [named[n] for n in names if named[n].requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for suffix, ps, wd in (("", decay, weight_decay), (".no_decay", no_decay, 0.0)):
            if ps:
                out.append({"name": name + suffix, "params": ps, "lr": group_lr, "base_lr": group_lr,
                            "weight_decay": wd})
    return out


def build_optimizer(param_groups: list[dict], *, name: str = "adamw", lr: float = 1e-3,
                    momentum: float = 0.9, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov) over `param_groups`; `fused` = torch's fused kernels (CPU and CUDA)."""
    if not param_groups:
        raise ConfigError("No trainable parameters: check strategy (everything is frozen)")
    kwargs = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=True, **kwargs)
    return torch.optim.AdamW(param_groups, lr=lr, **kwargs)  # adamw (optim.name is checked at start-up)


class StepSchedule:
    """Per-step LR schedule: every group's lr = its own `base_lr` x factor(step, total_steps).

    Unlike LambdaLR it also drives groups added later (gradual unfreezing), and the per-group
    ratios (head vs backbone, layer decay) hold at every step. `set_total_steps` re-spans the schedule
    (a `trainer.time_limit` run learns its step count after the first steps: training/budget.py).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int, int], float], total_steps: int):
        self.optimizer, self.factor, self.step_count, self.total_steps = optimizer, factor, 0, total_steps
        self.refresh()

    def refresh(self) -> None:
        f = self.factor(self.step_count, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * f

    def set_total_steps(self, total_steps: int) -> None:
        """The schedule now ends (cosine: reaches 0) at `total_steps`; the current LR follows at once."""
        self.total_steps = max(1, int(total_steps))
        self.refresh()

    def step(self) -> None:
        self.step_count += 1
        self.refresh()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.total_steps = int(state.get("total_steps", self.total_steps))
        self.refresh()


def build_scheduler(optimizer: torch.optim.Optimizer, *, name: str = "cosine", total_steps: int,
                    warmup_steps: int = 0) -> StepSchedule:
    """Linear warmup, then cosine decay to 0 (or constant) over `total_steps` optimizer steps."""
    def factor(step: int, total: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return StepSchedule(optimizer, factor, total_steps)
