"""Boundary-cached partial fine-tunes (training/boundary.py): the frozen prefix runs once, the top trains on its
cached activations, and what trains is the model itself."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

from pipeline.model import checkpoint, freezing
from pipeline.train import train
from pipeline.training import boundary


def _tiny(depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    freezing.apply_strategy(model, mode="partial", freeze_depth=depth)
    return model


def test_the_top_on_captured_activations_reproduces_the_model():
    model = _tiny()
    x = torch.randn(4, 3, 64, 64)
    split, why = boundary.split_at_boundary(model, x[:2])
    assert split is not None, why
    assert split.boundary.startswith("blocks.") and "conv_stem" in split.prefix
    model.eval()
    with torch.no_grad():
        assert torch.allclose(split.top(split.capture(x)), model(x), atol=1e-5)
    assert split.shape == tuple(split.capture(x).shape[1:]) and split.bytes_per_image() == 2 * split.shape[0] * \
        split.shape[1] * split.shape[2]
    assert isinstance(model.conv_stem, torch.nn.Conv2d)  # the model itself keeps its prefix


def test_training_the_top_trains_the_models_own_parameters_and_leaves_the_prefix():
    model = _tiny()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    split, _ = boundary.split_at_boundary(model, x[:2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    split.top.train()
    torch.nn.functional.cross_entropy(split.top(split.capture(x)), y).backward()
    optimizer.step()
    after = model.state_dict()
    assert set(after) == set(before)  # the checkpoint is the full model
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert torch.equal(after["conv_stem.weight"], before["conv_stem.weight"])


class _Functional(torch.nn.Module):
    """A forward that doubles its input between two modules: the captured input of `b` is not what `a` gave."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        self.a.requires_grad_(False)

    def forward(self, x):
        return self.b(self.a(x) * 2)


def test_a_forward_with_work_outside_its_modules_is_not_split():
    split, why = boundary.split_at_boundary(_Functional(), torch.randn(2, 4))
    assert split is None and "does not reproduce the model's output" in why


def test_nothing_frozen_is_not_split():
    split, why = boundary.split_at_boundary(_tiny(depth=0), torch.randn(2, 3, 64, 64))
    assert split is None and "nothing is frozen" in why


def test_a_read_takes_the_view_its_seed_names():
    acts = torch.arange(3 * 2 * 1, dtype=torch.float16).reshape(3, 2, 1)  # 3 views x 2 images
    views = boundary.BoundaryViews(acts, torch.tensor([0, 1]))
    assert len(views) == 2 and views[1][0].item() == 1.0  # a plain index: the eval view
    assert views[(1, 5)][0].item() == acts[2, 1].item() and views[(0, 4)][0].item() == acts[1, 0].item()


def test_a_partial_fine_tune_on_cached_activations_saves_the_full_model(tiny_folder, cfg_factory, caplog):
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "backbone.input_size=64",
                      "strategy=partial", "strategy.freeze_depth=4", "trainer.epochs=2", "trainer.max_train_batches=0",
                      "trainer.boundary_cache=always", "trainer.boundary_views=2")
    with caplog.at_level(logging.INFO):
        metrics = train(cfg)
    assert "Boundary cache at blocks." in caplog.text and "x 2 view(s)" in caplog.text
    assert metrics["status"] == "ok" and len(metrics["history"]) == 2
    assert metrics["history"][0]["train_images"] == 36  # every train image once per epoch (one view each)
    model, meta = checkpoint.load_checkpoint(Path(cfg.output_dir), "best")
    assert isinstance(model.conv_stem, torch.nn.Conv2d) and meta["epoch"] >= 1


@pytest.mark.parametrize("setting", ["trainer.ema=true", "strategy.bn=affine"])
def test_settings_the_cache_cannot_honour_train_on_images(tiny_folder, cfg_factory, caplog, setting):
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "backbone.input_size=64",
                      "strategy=partial", "strategy.freeze_depth=4", "trainer.boundary_cache=always", setting)
    with caplog.at_level(logging.INFO):
        assert train(cfg)["status"] == "ok"
    assert "Boundary cache at" not in caplog.text and "trainer.boundary_cache=always: not used" in caplog.text
