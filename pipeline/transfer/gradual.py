"""Gradual unfreezing (fastai `fine_tune` / Flash `unfreeze_milestones` style): head first, then thaw
layer groups from the top on a schedule, adding each thawed group to the optimizer at its own LR."""
from __future__ import annotations

import logging

import torch

from pipeline.config.schema import OptimConfig
from pipeline.model.freezing import freeze_to_depth, param_counts
from pipeline.transfer.optim import build_param_groups

_logger = logging.getLogger(__name__)


def gradual_depth(epoch: int, *, n_groups: int, floor: int, warmup_epochs: int, every: int,
                  groups_per_step: int) -> int:
    """Frozen depth for 1-based `epoch`: all groups during warmup, then `groups_per_step` fewer every `every` epochs."""
    if epoch <= warmup_epochs:
        return n_groups
    thaws = (epoch - warmup_epochs - 1) // max(1, every) + 1
    return max(floor, n_groups - thaws * max(1, groups_per_step))


def thaw_to_depth(model: torch.nn.Module, optimizer: torch.optim.Optimizer, depth: int, *, bn: str,
                  optim: OptimConfig) -> list[str]:
    """Unfreeze down to `depth` and add the newly trainable params to `optimizer`, at the LRs and weight decay of
    `optim` (as transfer/optim.py build_param_groups). Returns the new group names."""
    freeze_to_depth(model, depth, bn)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    added = []
    for group in build_param_groups(model, lr=optim.lr, backbone_lr_mult=optim.backbone_lr_mult,
                                    layer_decay=optim.layer_decay, weight_decay=optim.weight_decay):
        new = [p for p in group["params"] if id(p) not in in_optimizer]
        if new:
            optimizer.add_param_group({**group, "params": new})
            added.append(group["name"])
    counts = param_counts(model)
    _logger.info("Gradual unfreezing: frozen depth now %d, added %s; %s/%s params trainable", depth,
                 added or "nothing", f"{counts['trainable_params']:,}", f"{counts['total_params']:,}")
    return added
