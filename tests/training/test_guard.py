"""NaN/inf guard and gradient clipping: skip, stop after K in a row with a diagnosis, keep the last good state."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from pipeline.model import checkpoint
from pipeline.training import resume
from pipeline.training.guard import NonFiniteError, StepGuard, nonfinite_params

SMALL = ["dataset=folder", "backbone=tiny", "strategy=finetune", "trainer.epochs=2", "trainer.max_train_batches=2"]


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    groups = [{"name": "group0", "params": list(model[0].parameters())},
              {"name": "head", "params": list(model[1].parameters())}]
    return model, torch.optim.SGD(groups, lr=0.1)


def _backward(model, scale: float = 1.0):
    x = torch.randn(3, 4)
    loss = model(x).pow(2).sum() * scale
    loss.backward()
    return loss, x


def test_grad_clip_bounds_the_global_norm_and_zero_leaves_it():
    model, opt = _model_and_optimizer()
    loss, x = _backward(model, scale=1e4)
    before = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert StepGuard(5, grad_clip=0.0).grads_ok(model, opt, loss, x)
    assert torch.equal(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]), before)
    assert StepGuard(5, grad_clip=1.0).grads_ok(model, opt, loss, x)
    assert before > 100 and torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) <= 1.0 + 1e-5


def test_non_finite_steps_are_skipped_counted_reset_and_stop_at_k_naming_the_group():
    model, opt = _model_and_optimizer()
    guard = StepGuard(max_nonfinite_steps=2)
    loss, x = _backward(model)
    model[0].weight.grad[0, 0] = math.nan
    assert not guard.grads_ok(model, opt, loss, x) and guard.consecutive == 1
    model[0].weight.grad[0, 0] = 0.0
    assert guard.grads_ok(model, opt, loss, x) and guard.consecutive == 0  # a good step resets the count
    model[0].weight.grad[0, 0] = math.inf
    assert not guard.grads_ok(model, opt, loss, x)
    with pytest.raises(NonFiniteError, match=r"2 consecutive non-finite steps: non-finite gradients in param "
                                             r"group\(s\) group0: LR too high\? \(optim.lr=0.1\): try optim.lr=0.01"):
        guard.grads_ok(model, opt, loss, x)
    assert guard.total == 3


def test_non_finite_input_batch_is_skipped_before_the_forward_pass():
    model, opt = _model_and_optimizer()
    guard = StepGuard(max_nonfinite_steps=1)
    x = torch.randn(4, 4)
    x[2, 1] = math.nan
    with pytest.raises(NonFiniteError, match=r"input batch has non-finite values \(1/4 images\): data with NaN"):
        guard.inputs_ok(model, opt, x)


def test_nan_inputs_mid_run_stop_training_and_keep_the_last_good_checkpoint(tiny_folder, cfg_factory, monkeypatch):
    from pipeline.data import folder
    poisoned = {"on": False}
    get_item, save = folder.ImageDataset.__getitem__, resume.LastCheckpoint.save

    def getitem(self, i):
        item = get_item(self, i)
        return (torch.full_like(item[0], math.nan), item[1]) if poisoned["on"] else item

    def save_then_poison(self, *args, **kwargs):  # the data goes bad after epoch 1 was saved
        save(self, *args, **kwargs)
        poisoned["on"] = True

    monkeypatch.setattr(folder.ImageDataset, "__getitem__", getitem)
    monkeypatch.setattr(resume.LastCheckpoint, "save", save_then_poison)
    cfg = cfg_factory(f"dataset.root={tiny_folder}", *SMALL, "trainer.max_nonfinite_steps=2")
    with pytest.raises(NonFiniteError) as err:
        from pipeline.train import train
        train(cfg)
    assert "input batch has non-finite values (8/8 images)" in str(err.value)
    assert f"Last good checkpoint kept: {Path(cfg.output_dir) / 'last.pt'} (epoch 1)" in str(err.value)
    state = checkpoint.load_state(Path(cfg.output_dir) / "last.pt")
    assert state["epoch"] == 1 and state["guard"]["consecutive"] == 0
    model, _ = checkpoint.load_checkpoint(cfg.output_dir, "best")
    model.load_state_dict(state["model"])
    assert nonfinite_params(model) == []  # BatchNorm statistics never saw the NaN batches


def test_absurd_lr_stops_with_a_diagnosis_and_marks_the_run_failed(tiny_folder, tmp_path, monkeypatch, capsys):
    from pipeline.train import main

    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train", "trainer=smoke", f"dataset.root={tiny_folder}", *SMALL,
                                      "optim.lr=1e10", f"output_dir={run}", f"hydra.run.dir={tmp_path / 'hydra'}",
                                      f"data_dir={tmp_path / 'data'}"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err.startswith("error: Training stopped")
    assert "the weights diverged" in err and "LR too high? (optim.lr=1e+10): try optim.lr=1e+09" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"].startswith("NonFiniteError")
    if (run / "last.pt").exists():  # whatever was saved before the divergence is finite
        state = checkpoint.load_state(run / "last.pt")
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
