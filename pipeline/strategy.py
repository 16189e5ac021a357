"""Strategy stage: which layer groups train, and how frozen BatchNorm layers behave."""
from __future__ import annotations

import logging

import torch
from timm.models._manipulate import group_parameters

from pipeline.errors import ConfigError

_logger = logging.getLogger(__name__)

MODES = ("linear_probe", "partial", "finetune")
BN_POLICIES = ("frozen", "affine", "train")
_BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


def head_param_names(model: torch.nn.Module) -> list[str]:
    """Parameters of the replaced classifier (timm's pretrained_cfg['classifier'])."""
    head = model.pretrained_cfg.get("classifier", "classifier")
    heads = head if isinstance(head, (list, tuple)) else [head]
    return [n for n, _ in model.named_parameters() if any(n == h or n.startswith(h + ".") for h in heads)]


def layer_groups(model: torch.nn.Module) -> list[list[str]]:
    """Backbone parameter names in groups from the input (stem, stage 1..n), via timm's group_matcher."""
    head = set(head_param_names(model))
    groups = group_parameters(model, model.group_matcher(coarse=True))
    ordered = [[n for n in names if n not in head] for _, names in sorted(groups.items())]
    return [g for g in ordered if g]


def resolve_freeze_depth(mode: str, freeze_depth, n_groups: int) -> int:
    """Number of layer groups to freeze from the input for `mode`; validates the value."""
    if mode not in MODES:
        raise ConfigError(f"strategy.mode='{mode}' is not valid; choose one of: {', '.join(MODES)}")
    if mode == "linear_probe":
        return n_groups
    if mode == "finetune":
        return 0
    if freeze_depth == "all":
        return n_groups
    if isinstance(freeze_depth, bool) or not isinstance(freeze_depth, int) or not 0 <= freeze_depth <= n_groups:
        raise ConfigError(f"strategy.freeze_depth={freeze_depth!r} is out of range for this backbone: "
                         f"use an integer 0..{n_groups} or 'all' ({n_groups} layer groups)")
    return freeze_depth


def _keep_eval(module: torch.nn.Module, args) -> None:
    """Forward pre-hook: a frozen BN layer normalises with its running stats, whatever model.train() said."""
    module.training = False


def set_bn_policy(model: torch.nn.Module, frozen_params: set[str], policy: str) -> int:
    """Apply the BN policy to BatchNorm layers whose parameters are frozen. Returns how many were affected.

    frozen: eval mode (running stats never update) and affine params frozen.
    affine: running stats frozen, affine params train again.
    train:  BN layers train normally (stats update, affine params train).
    """
    if policy not in BN_POLICIES:
        raise ConfigError(f"strategy.bn='{policy}' is not valid; choose one of: {', '.join(BN_POLICIES)}")
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, _BN_TYPES):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if not params or not all(p in frozen_params for p in params):
            continue
        count += 1
        if policy in ("affine", "train"):
            module.requires_grad_(True)
        if policy in ("frozen", "affine"):
            module.register_forward_pre_hook(_keep_eval)
            module.eval()
    return count


def apply_strategy(model: torch.nn.Module, *, mode: str, freeze_depth=0, bn: str = "frozen") -> dict:
    """Freeze the first layer groups per `mode`, apply the BN policy, and return a summary."""
    groups = layer_groups(model)
    depth = resolve_freeze_depth(mode, freeze_depth, len(groups))
    frozen = {n for g in groups[:depth] for n in g}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    bn_count = set_bn_policy(model, frozen, bn)
    info = {"mode": mode, "freeze_depth": depth, "n_groups": len(groups), "bn": bn, "frozen_bn_layers": bn_count,
            **param_counts(model)}
    _logger.info("Strategy %s: %d/%d layer groups frozen, %s/%s params trainable", mode, depth, len(groups),
                 f"{info['trainable_params']:,}", f"{info['total_params']:,}")
    return info


def param_counts(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}
