"""Strategy stage: which layer groups train, and how frozen BatchNorm layers behave."""
from __future__ import annotations

import logging

import torch
from timm.models._manipulate import group_parameters

from pipeline.errors import ConfigError

_logger = logging.getLogger(__name__)

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
    """Number of layer groups to freeze from the input for `mode`; checks the depth against this backbone."""
    if mode == "linear_probe":
        return n_groups
    if mode == "finetune":
        return 0
    if mode == "auto":
        raise ConfigError("strategy.mode=auto must be resolved (pipeline.transfer.auto) before freezing")
    if freeze_depth == "all":
        return n_groups
    if isinstance(freeze_depth, bool) or not isinstance(freeze_depth, int) or not 0 <= freeze_depth <= n_groups:
        raise ConfigError(f"strategy.freeze_depth={freeze_depth!r} is out of range for this backbone: "
                         f"use an integer 0..{n_groups} or 'all' ({n_groups} layer groups)")
    return freeze_depth


def _keep_eval(module: torch.nn.Module, args) -> None:
    """Forward pre-hook: a frozen BN layer normalises with its running stats, whatever model.train() said."""
    module.training = False


_HOOK_ATTR = "_pipeline_keep_eval_hook"


def _release_bn(module: torch.nn.Module) -> None:
    handle = getattr(module, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(module, _HOOK_ATTR)


def set_bn_policy(model: torch.nn.Module, frozen_params: set[str], policy: str) -> int:
    """Apply the BN policy to BatchNorm layers whose parameters are frozen. Returns how many were affected.

    frozen: eval mode (running stats never update) and affine params frozen.
    affine: running stats frozen, affine params train again.
    train:  BN layers train normally (stats update, affine params train).
    """
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, _BN_TYPES):
            continue
        _release_bn(module)  # re-applied below if still frozen (gradual thawing calls this again)
        params = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if not params or not all(p in frozen_params for p in params):
            continue
        count += 1
        if policy in ("affine", "train"):
            module.requires_grad_(True)
        if policy in ("frozen", "affine"):
            setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_keep_eval))
            module.eval()
    return count


def freeze_to_depth(model: torch.nn.Module, depth: int, bn: str = "frozen") -> int:
    """Freeze exactly the first `depth` layer groups (the rest and the head train); returns frozen BN layers."""
    groups = layer_groups(model)
    frozen = {n for g in groups[:depth] for n in g}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return set_bn_policy(model, frozen, bn)


def apply_strategy(model: torch.nn.Module, *, mode: str, freeze_depth=0, bn: str = "frozen") -> dict:
    """Freeze the first layer groups per `mode`, apply the BN policy, and return a summary.

    `gradual` starts head-only (everything frozen); pipeline.transfer.gradual thaws groups during training.
    """
    n_groups = len(layer_groups(model))
    if mode == "gradual":
        floor = resolve_freeze_depth("partial", freeze_depth, n_groups)
        depth = n_groups
    else:
        floor = depth = resolve_freeze_depth(mode, freeze_depth, n_groups)
    bn_count = freeze_to_depth(model, depth, bn)
    info = {"mode": mode, "freeze_depth": depth, "final_freeze_depth": floor, "n_groups": n_groups, "bn": bn,
            "frozen_bn_layers": bn_count, **param_counts(model), "groups": group_param_table(model)}
    _logger.info("Strategy %s: %d/%d layer groups frozen, %s/%s params trainable", mode, depth, n_groups,
                 f"{info['trainable_params']:,}", f"{info['total_params']:,}")
    return info


def param_counts(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}


def group_param_table(model: torch.nn.Module) -> list[dict]:
    """Per layer group (input to output, then the head): parameter count and trainable count."""
    named = dict(model.named_parameters())
    rows = [(f"group{i}", names) for i, names in enumerate(layer_groups(model))]
    rows.append(("head", head_param_names(model)))
    return [{"group": g, "first_param": names[0] if names else "", "params": sum(named[n].numel() for n in names),
             "trainable": sum(named[n].numel() for n in names if named[n].requires_grad)} for g, names in rows]
