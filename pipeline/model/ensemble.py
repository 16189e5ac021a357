"""Several classifiers over the same classes as one module: the log of the mean of their calibrated probabilities.

auto under a time limit ships the probe + fine-tune ensemble where it beats the kept model on val
(budgeted/auto_budget.py). A checkpoint's JSON says so with `"ensemble": {"members": [{"temperature": T,
"feature_levels": ..., "role": "probe"}, ...]}`; the weights are the members' state dicts under `members.<i>.model.`.
`EnsembleClassifier` returns log(mean_i softmax(member_i(x) / T_i)), which a softmax turns back into the mean
probability, so every consumer (TTA, the run's temperature, export, `pipeline.load`) treats it as logits. It scripts
with TorchScript and exports to ONNX. Each member runs a whole backbone: inference costs that many times one model's.

Only torch here: `pipeline.load` rebuilds exported ensembles from this module and model/checkpoint.py.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

KEY = "ensemble"  # the checkpoint JSON's key
PREFIX = "members"
MAX_MEMBERS = 4


class Tempered(nn.Module):
    """softmax(model(x) / temperature): one member's calibrated probabilities."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float() / self.temperature, dim=1)


class EnsembleClassifier(nn.Module):
    """log of the mean of the members' temperature-scaled probabilities (logits in the sense of softmax)."""

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float]):
        super().__init__()
        if not 2 <= len(members) <= MAX_MEMBERS or len(members) != len(temperatures):
            raise ValueError(f"an ensemble takes 2..{MAX_MEMBERS} members, each with a temperature")
        self.members = nn.ModuleList([Tempered(m, t) for m, t in zip(members, temperatures)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [member(x) for member in self.members]
        return torch.log(torch.stack(probs).mean(dim=0).clamp_min(1e-12))


def member_models(model: nn.Module) -> list[nn.Module]:
    """The classifiers inside an EnsembleClassifier (Grad-CAM explains each); [model] for any other module."""
    return [m.model for m in model.members] if isinstance(model, EnsembleClassifier) else [model]


def combined_weights(members: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state dict for an EnsembleClassifier from its members' state dicts, in member order."""
    return {f"{PREFIX}.{i}.model.{k}": v for i, weights in enumerate(members) for k, v in weights.items()}


def spec(temperatures: Sequence[float], roles: Sequence[str], feature_levels: Sequence | None = None) -> dict:
    """The checkpoint JSON's `ensemble` value (feature_levels: one entry per member, None for the plain head)."""
    levels = list(feature_levels) if feature_levels is not None else [None] * len(temperatures)
    return {"members": [{"temperature": float(t), "role": r, **({"feature_levels": lv} if lv else {})}
                        for t, r, lv in zip(temperatures, roles, levels)]}
