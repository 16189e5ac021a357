"""The run's strategy: `strategy.mode=auto` resolved (transfer/auto.py; decision.json) and the model frozen
accordingly (model/freezing.py). Under `trainer.time_limit` the fine-tune's depth is planned later, after the
probe (budgeted/auto_budget.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config.schema import StrategyConfig
from pipeline.data.loaders import TrainingData
from pipeline.model import freezing
from pipeline.runtime import distributed
from pipeline.training import resume
from pipeline.transfer import auto


@dataclass
class StrategyDecision:
    """The run's strategy: how the model is frozen (model/freezing.py apply_strategy's summary: mode, depths,
    parameter counts, per-group table), auto's `decision` (decision.json; None unless `strategy.mode=auto`), and
    what the fit adds: the probe the head started from (`head_init`) and the cached probe's `features` record."""
    freezing: dict
    decision: dict | None
    head_init: dict | None = None
    features: dict | None = None

    @property
    def mode(self) -> str:
        return self.freezing["mode"]

    def record(self) -> dict:
        """The JSON-ready facts (metrics.json's strategy keys, report.md's strategy sections)."""
        extra = {k: v for k, v in (("head_init", self.head_init), ("features", self.features)) if v is not None}
        return {**self.freezing, "decision": self.decision, **extra}


def setup_strategy(model: torch.nn.Module, data: TrainingData, device: torch.device, run_dir: Path, *,
                   strategy: StrategyConfig, time_limited: bool, resumed: bool = False) -> StrategyDecision:
    """Resolve the mode (a resumed run reuses its own decision.json) and freeze `model` accordingly."""
    mode, depth, decision = strategy.mode, strategy.freeze_depth, None
    if mode == "auto":  # DDP: rank 0 decides, the others receive its decision
        decision = distributed.from_main(lambda: resume.saved_decision(run_dir) if resumed else
                                         auto.decide_strategy(
            model, data.splits.train, data.eval_tf, device, n_groups=len(freezing.layer_groups(model)),
            auto_cfg=strategy.auto, seed=data.settings.seed))
        if time_limited and not resumed:  # a resumed run keeps its own decision
            decision = auto.mode_under_time_limit(decision, strategy.auto.similar_freeze_depth)
        if distributed.is_main():
            auto.write_decision(run_dir, decision)
        mode, depth = decision["mode"], decision["freeze_depth"]
    return StrategyDecision(freezing.apply_strategy(model, mode=mode, freeze_depth=depth, bn=strategy.bn), decision)
