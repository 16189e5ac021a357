"""Strategy stage: freezing per mode/depth, BN policies, optimizer contents, per-group LRs, gradual thawing."""
from __future__ import annotations

import pytest
import timm
import torch

from pipeline.config.schema import OptimConfig
from pipeline.errors import ConfigError
from pipeline.model import freezing
from pipeline.transfer import gradual, optim

ARCHS = ["test_efficientnet", "test_resnet"]


def _model(arch):
    torch.manual_seed(0)
    return timm.create_model(arch, num_classes=3)


def _bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


def _train_steps(model, optimizer, steps=3):
    for _ in range(steps):
        model.train()  # every call must leave frozen BN in eval
        loss = model(torch.randn(4, 3, 64, 64)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode,depth", [("linear_probe", None), ("finetune", None), ("partial", 0), ("partial", 1),
                                        ("partial", 3), ("partial", "all")])
def test_exactly_the_expected_params_train(arch, mode, depth):
    model = _model(arch)
    groups = freezing.layer_groups(model)
    info = freezing.apply_strategy(model, mode=mode, freeze_depth=depth if depth is not None else 0)
    k = {"linear_probe": len(groups), "finetune": 0}.get(mode, len(groups) if depth == "all" else depth)
    frozen = {n for g in groups[:k] for n in g}
    for name, p in model.named_parameters():
        assert p.requires_grad == (name not in frozen), name
    assert all(p.requires_grad for n, p in model.named_parameters() if n in freezing.head_param_names(model))
    assert info["freeze_depth"] == k
    assert info["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(g["trainable"] for g in info["groups"]) == info["trainable_params"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bn", ["frozen", "affine", "train"])
def test_bn_policies(arch, bn):
    model = _model(arch)
    freezing.apply_strategy(model, mode="partial", freeze_depth=2, bn=bn)
    frozen_names = {n for g in freezing.layer_groups(model)[:2] for n in g}
    bn_modules = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    bn_params = {n for n in frozen_names if n.rsplit(".", 1)[0] in bn_modules}
    other_params = frozen_names - bn_params
    frozen_stats = [n for n in _bn_stats(model) if n.rsplit(".", 1)[0] + ".weight" in bn_params]
    assert bn_params and other_params and frozen_stats
    stats_before = _bn_stats(model)
    params_before = {n: p.clone() for n, p in model.named_parameters() if n in frozen_names}
    opt = optim.build_optimizer(optim.build_param_groups(model, lr=0.1, backbone_lr_mult=1.0), lr=0.1)
    _train_steps(model, opt)
    stats_after, params_after = _bn_stats(model), dict(model.named_parameters())
    stats_same = all(torch.equal(stats_before[n], stats_after[n]) for n in frozen_stats)
    assert stats_same == (bn in ("frozen", "affine"))
    affine_changed = any(not torch.equal(params_before[n], params_after[n]) for n in bn_params)
    assert affine_changed == (bn in ("affine", "train"))
    assert all(torch.equal(params_before[n], params_after[n]) for n in other_params)  # convs stay frozen


@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_holds_only_trainable_params(arch):
    model = _model(arch)
    freezing.apply_strategy(model, mode="partial", freeze_depth=3)
    opt = optim.build_optimizer(optim.build_param_groups(model, lr=1e-3), lr=1e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheduler", ["constant", "cosine"])
def test_group_lrs_follow_multiplier_and_layer_decay(arch, scheduler):
    model = _model(arch)
    freezing.apply_strategy(model, mode="finetune")
    base, mult, decay = 1e-2, 0.1, 0.5
    groups = optim.build_param_groups(model, lr=base, backbone_lr_mult=mult, layer_decay=decay)
    opt = optim.build_optimizer(groups, lr=base)
    sched = optim.build_scheduler(opt, name=scheduler, total_steps=10)
    opt.step()
    sched.step()
    factor = opt.param_groups[0]["lr"] / base
    assert factor == pytest.approx(1.0 if scheduler == "constant" else 0.5 * (1 + torch.cos(torch.tensor(0.1 * 3.141592653589793)).item()))
    n = len(freezing.layer_groups(model))
    for g in opt.param_groups:
        name = g["name"].split(".")[0]
        expected = base if name == "head" else base * mult * decay ** (n - 1 - int(name.removeprefix("group")))
        assert g["lr"] == pytest.approx(expected * factor, rel=1e-9), g["name"]


def test_gradual_schedule_and_thaw_adds_groups():
    assert [gradual.gradual_depth(e, n_groups=5, floor=1, warmup_epochs=2, every=1, groups_per_step=2)
            for e in range(1, 7)] == [5, 5, 3, 1, 1, 1]
    model = _model("test_efficientnet")
    freezing.apply_strategy(model, mode="gradual", freeze_depth=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(freezing.head_param_names(model))
    opt = optim.build_optimizer(optim.build_param_groups(model, lr=1e-2, backbone_lr_mult=0.1), lr=1e-2)
    sched = optim.build_scheduler(opt, name="cosine", total_steps=10)
    bn_stem = model.bn1
    stem_stats = bn_stem.running_mean.clone()
    added = gradual.thaw_to_depth(model, opt, 0, bn="frozen", optim=OptimConfig(
        lr=1e-2, backbone_lr_mult=0.1, layer_decay=1.0, weight_decay=0.0))
    sched.refresh()
    assert "group0" in added and all(p.requires_grad for p in model.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert all(g["lr"] == pytest.approx(1e-3) for g in opt.param_groups if g["name"].startswith("group"))
    _train_steps(model, opt, 1)
    assert not torch.equal(stem_stats, bn_stem.running_mean)  # thawed BN trains again


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="partial", freeze_depth=99), r"out of range .* 0\.\.6 or 'all'"),
])
def test_freeze_depth_beyond_the_backbone_fails_with_its_range(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        freezing.apply_strategy(_model("test_efficientnet"), **kwargs)


@pytest.mark.parametrize("override,match", [
    ("optim.lr=-0.1", "optim.lr=-0.1 must be positive"),
    ("strategy.mode=unknown", "choose one of"),
    ("strategy.freeze_depth=-2", "integer >= 0"),
    ("optim.layer_decay=1.5", r"must be in \(0, 1\]"),
])
def test_bad_values_fail_at_start_up(cfg_factory, override, match):
    from pipeline.train import train

    with pytest.raises(ConfigError, match=match):
        train(cfg_factory("backbone=tiny", "dataset=folder", "dataset.root=/does/not/matter", override))
