"""strategy.head_init=probe (LP-FT): the fine-tune starts from the cached linear-probe head; zero stays zero."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.features import probe_init
from pipeline.train import train
from pipeline.training import loop
from pipeline.training.metrics import classification_metrics


def _finetune_cfg(cfg_factory, root, *extra):
    return cfg_factory("dataset=folder", f"dataset.root={root}", "backbone=tiny", "backbone.input_size=64",
                       "strategy=finetune", "optim.lr=0.05", "features.head=linear", "features.head_epochs=3",
                       "features.head_patience=0",
                       *extra)


def _spy_first_step(monkeypatch) -> dict:
    """The classifier's weight and bias as the first train epoch starts (before any optimizer step)."""
    seen, original = {}, loop.train_one_epoch

    def spy(model, *args, **kwargs):
        if not seen:
            head = model.get_classifier()
            seen.update(weight=head.weight.detach().cpu().clone(), bias=head.bias.detach().cpu().clone())
        return original(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", spy)
    return seen


def _spy_probe_head(monkeypatch) -> list:
    heads, original = [], probe_init.train_head

    def spy(*args, **kwargs):
        heads.append(original(*args, **kwargs))
        return heads[-1]

    monkeypatch.setattr(probe_init, "train_head", spy)
    return heads


def test_probe_head_is_installed_before_the_first_step_and_a_resume_keeps_its_weights(tiny_folder, cfg_factory,
                                                                                        monkeypatch, tmp_path):
    first_step, probes = _spy_first_step(monkeypatch), _spy_probe_head(monkeypatch)
    cfg = _finetune_cfg(cfg_factory, tiny_folder, "strategy.head_init=probe", "trainer.epochs=1",
                        "trainer.keep_last=true")
    metrics = train(cfg)
    (probe,) = probes
    assert probe["weight"].any()  # a trained head, not the zero init
    assert torch.allclose(first_step["weight"], torch.as_tensor(probe["weight"]).float(), atol=1e-6)
    assert torch.allclose(first_step["bias"], torch.as_tensor(probe["bias"]).float(), atol=1e-6)
    info = metrics["head_init"]
    assert info["kind"] == "probe" and info["epochs"] == len(probe["history"]) == 3  # features.head_epochs
    assert info["val_balanced_accuracy"] == probe["history"][info["best_epoch"] - 1]["val_balanced_accuracy"]
    run = Path(cfg.output_dir)
    assert json.loads((run / "metrics.json").read_text())["head_init"] == info
    assert "## Head initialisation" in (run / "summary.md").read_text()

    # The probe used the cached frozen-backbone features: its head scores them as it reported, and a linear_probe
    # run of the same backbone and data finds them in the cache.
    val = load_file(str(next(p for p in Path(cfg.features.cache_dir).glob("*.safetensors")
                             if json.loads(p.with_suffix(".json").read_text())["name"] == "val")))
    logits = val["features"].numpy() @ probe["weight"].T + probe["bias"]
    scored = classification_metrics(val["labels"].numpy(), logits.argmax(1), 3)["balanced_accuracy"]
    assert scored == pytest.approx(info["val_balanced_accuracy"])
    lp = train(cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "backbone.input_size=64",
                           "strategy=linear_probe", f"output_dir={tmp_path / 'lp'}"))
    assert [lp["features"]["extraction"][s]["hit"] for s in ("train", "val")] == [True, True]

    # Resume (as if killed after the last epoch): the restored weights win, no second probe.
    (run / "metrics.json").unlink()
    first_step.clear()
    monkeypatch.setattr(probe_init, "train_head", lambda *a, **k: pytest.fail("a resumed run must not re-fit"))
    again = train(cfg_factory(f"trainer.resume={run}"))
    assert again["resumed_from_epoch"] == 1 and again["head_init"] == {**info, "resumed": True}


def test_zero_head_init_starts_the_fine_tune_from_a_zero_head(tiny_folder, cfg_factory, monkeypatch):
    first_step, probes = _spy_first_step(monkeypatch), _spy_probe_head(monkeypatch)
    metrics = train(_finetune_cfg(cfg_factory, tiny_folder, "strategy.head_init=zero", "trainer.epochs=1"))
    assert not probes and "head_init" not in metrics
    assert not first_step["weight"].any() and not first_step["bias"].any()


def test_probe_does_not_apply_where_the_head_trains_alone(tiny_folder, cfg_factory):
    cfg = _finetune_cfg(cfg_factory, tiny_folder, "strategy.head_init=probe")
    # linear_probe with features.cached=false: the fine-tune fit trains the head alone, from zero as before
    assert probe_init.init_head(lambda head: pytest.fail("no probe for a head that trains alone"),
                                head_init=cfg.strategy.head_init, head=cfg.features.head, mode="linear_probe",
                                run_dir=Path("unused")) is None
