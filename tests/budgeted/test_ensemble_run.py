"""A run whose selection ships the probe + fine-tune ensemble (budgeted/selection.py): `best` is the ensemble of the
run's own `probe` and `finetune` checkpoints, its numbers are the ensemble's, and the export, `pipeline.load`, ONNX
and TorchScript all give the mean of the two members' calibrated probabilities.

Whether the ensemble wins is the paired test's call (tests/budgeted/test_selection.py); here the selection is made to
choose it, so that what ships can be checked against its members."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
import pipeline.train as train_module
from conftest import compose_cfg, write_tiny_folder
from pipeline.budgeted import auto_budget, selection
from pipeline.model.checkpoint import load_checkpoint
from pipeline.ship.saving import export_run
from pipeline.train import train


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    """(data, run, export, metrics) of a tiny auto run under a limit whose selection keeps the ensemble."""
    base = tmp_path_factory.mktemp("ensemble")
    data = write_tiny_folder(base / "tiny")
    cfg = compose_cfg([f"output_dir={base / 'run'}", f"data_dir={base / 'data'}", "trainer=smoke", "dataset=folder",
                       f"dataset.root={data}", "backbone=tiny", "backbone.input_size=64", "strategy=auto",
                       "strategy.auto.similar_gain=5", "trainer.time_limit=10m", "trainer.epochs=2",
                       "trainer.max_train_batches=0", "optim.lr=0.05", "features.head_epochs=5",
                       "trainer.tta=flip", "trainer.calibrate=true", "dataset.test_fraction=0.2"])
    original = selection.select

    def choose_the_ensemble(*args, **kwargs):
        chosen = original(*args, **kwargs)
        assert chosen.ensemble_val is not None  # a fine-tune epoch was scored
        return dataclasses.replace(chosen, kept="ensemble", ensemble={**chosen.ensemble, "shipped": True})

    seen, run, after_loop = {}, auto_budget.run, train_module.images_after_loop

    def spy_run(settings, decision, job):
        seen["kept_for"] = job.final_images
        return run(settings, decision, job)

    def spy_after_loop(*args, **kwargs):
        seen["one_model"] = after_loop(*args, **kwargs)
        return seen["one_model"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "select", choose_the_ensemble)
        mp.setattr(auto_budget, "run", spy_run)
        mp.setattr(train_module, "images_after_loop", spy_after_loop)
        metrics = train(cfg)
    metrics["seen"] = seen
    return data, base / "run", export_run(base / "run", base / "export",
                                          formats=["safetensors", "onnx", "torchscript"]), metrics


def test_best_is_the_ensemble_of_the_runs_probe_and_fine_tune(ensemble_run):
    _, run, _, metrics = ensemble_run
    best = json.loads((run / "best.json").read_text())
    members = best["ensemble"]["members"]
    assert best["weights_source"] == "ensemble" and [m["role"] for m in members] == ["probe", "fine-tune"]
    finetune = json.loads((run / "finetune.json").read_text())
    assert finetune["epoch"] == best["epoch"] == metrics["best_epoch"] >= 1
    assert {k: metrics["val"][k] for k in best["val_metrics"]} == best["val_metrics"]  # the ensemble's val ...
    assert metrics["val"]["loss"] != metrics["history"][best["epoch"] - 1]["val_loss"]  # ... not the epoch's
    record = metrics["decision"]["budget"]
    assert record["kept"] == "ensemble" and record["ensemble"]["shipped"]
    assert "kept: **ensemble**" in (run / "summary.md").read_text()
    assert (run / "top_losses_val_cam.png").is_file()  # Grad-CAM explains the ensemble through its members
    assert {"accuracy", "balanced_accuracy"} <= set(metrics["test"])  # scored by the ensemble checkpoint


def test_the_budget_keeps_time_for_two_models_after_the_loop(ensemble_run):
    """An ensemble runs two backbones through the test split and the final checks: the plan and the fit keep time
    for twice one model's work (strategy.auto.ensemble=true)."""
    seen = ensemble_run[3]["seen"]
    assert seen["kept_for"] == 2 * seen["one_model"] > 0


def _member_probabilities(run: Path, x: torch.Tensor) -> torch.Tensor:
    """What the ensemble must give: the mean of the members' probabilities at their temperatures, over the run's
    TTA views, divided by the run's temperature (the chain model/calibrated.py + model/ensemble.py compute)."""
    best = json.loads((run / "best.json").read_text())
    members = [load_checkpoint(run, name)[0] for name in ("probe", "finetune")]
    temperatures = [m["temperature"] for m in best["ensemble"]["members"]]

    def ensemble(batch: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(m(batch) / t, 1) for m, t in zip(members, temperatures)]
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))

    with torch.no_grad():
        views = [x] + ([torch.flip(x, dims=[3])] if "hflip" in best["tta"] else [])
        logits = sum(ensemble(v) for v in views) / len(views)
    return torch.softmax(logits / best["temperature"], 1)


def test_every_format_gives_the_mean_of_the_members_probabilities(ensemble_run):
    data, run, out, _ = ensemble_run
    doc = json.loads((out / "model.json").read_text())
    assert doc["ensemble"] == json.loads((run / "best.json").read_text())["ensemble"]
    loaded = pipeline.load(out)
    paths = sorted(str(p) for p in (data / "val").rglob("*.png"))
    x = torch.stack([loaded.preprocess(p) for p in paths])
    expected = _member_probabilities(run, x)
    ts = torch.jit.load(str(out / "model.ts"), map_location="cpu")
    with torch.no_grad():
        probs = {"torch": torch.softmax(loaded.logits(x), 1), "onnx": torch.softmax(pipeline.load(
            out, backend="onnx").logits(x), 1), "torchscript": torch.softmax(ts(x), 1)}
    for name, p in probs.items():
        assert torch.allclose(p, expected, atol=1e-4), name
    assert set(doc["parity"]) == {"safetensors", "onnx", "torchscript"}  # each within the export's tolerance
    card = (out / "MODEL_CARD.md").read_text()
    assert "an ensemble of 2 models" in card and "2x one model's cost" in card


def test_the_ensemble_val_numbers_are_what_the_best_checkpoint_scores(ensemble_run):
    """metrics.json's val accuracy (from the selection's val logits) is the best checkpoint's on the val images."""
    data, run, out, metrics = ensemble_run
    rows = list(csv.DictReader((run / "split.csv").open()))
    names = json.loads((run / "best.json").read_text())["class_names"]
    val = [(Path(r["path"]) if Path(r["path"]).is_absolute() else data / r["path"], names.index(r["label"]))
           for r in rows if r["split"] == "val"]
    preprocess, (model, _) = pipeline.load(out).preprocess, load_checkpoint(run, "best")  # no TTA, no temperature
    with torch.no_grad():
        preds = model(torch.stack([preprocess(str(p)) for p, _ in val])).argmax(1).numpy()
    accuracy = float(np.mean(preds == np.array([y for _, y in val])))
    assert len(val) == metrics["val"]["num_samples"] and accuracy == pytest.approx(metrics["val"]["accuracy"])
