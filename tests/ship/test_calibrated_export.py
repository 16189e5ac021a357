"""A run trained with trainer.tta=flip and trainer.calibrate=true, exported: every format (pipeline.load, ONNX,
TorchScript) and predict's CSV give the same calibrated TTA probabilities, and those differ from the plain model's."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

import pipeline
from conftest import CLASSES, compose_cfg, write_tiny_folder
from pipeline.model.checkpoint import load_checkpoint
from pipeline.ship import batch_predict
from pipeline.ship.saving import export_run
from pipeline.train import train

PHOTOS = ("china.jpg", "flower.jpg")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, run, export) of a tiny run with TTA and temperature scaling (lr 0.03: T 1.93; at 0.01 it was 1.05, too
    near 1 to tell applied from not), exported in every format."""
    base = tmp_path_factory.mktemp("calibrated")
    data = write_tiny_folder(base / "tiny")
    cfg = compose_cfg([f"output_dir={base / 'run'}", f"data_dir={base / 'data'}", "trainer=smoke", "dataset=folder",
                       f"dataset.root={data}", "backbone=tiny", "backbone.input_size=64", "strategy=finetune",
                       "trainer.epochs=2", "trainer.max_train_batches=0", "optim.lr=0.03", "trainer.tta=flip",
                       "trainer.calibrate=true"])
    train(cfg)
    for name in PHOTOS:  # real photos beside the generated PNGs
        Image.fromarray(load_sample_image(name)).save(base / name, quality=90)
    return data, base / "run", export_run(base / "run", base / "export",
                                          formats=["safetensors", "onnx", "torchscript"])


def images(data: Path) -> list[str]:
    """The run's val PNGs, then sklearn's two sample photos (JPEG)."""
    return sorted(str(p) for p in (data / "val").rglob("*.png")) + [str(data.parent / n) for n in PHOTOS]


def test_every_format_gives_the_calibrated_tta_probabilities(calibrated):
    data, run, out = calibrated
    doc, best = json.loads((out / "model.json").read_text()), json.loads((run / "best.json").read_text())
    t = best["temperature"]
    assert doc["tta"] == best["tta"] == ["identity", "hflip"] and doc["temperature"] == t and abs(t - 1) > 0.05
    loaded = pipeline.load(out)
    x = torch.stack([loaded.preprocess(p) for p in images(data)])
    plain_model, _ = load_checkpoint(run, "best")  # the plain network, as trained
    with torch.no_grad():
        plain, flipped = plain_model(x), plain_model(torch.flip(x, dims=[3]))
    expected = torch.softmax((plain + flipped) / 2 / t, dim=1)
    ts = torch.jit.load(str(out / "model.ts"), map_location="cpu")
    with torch.no_grad():
        probs = {"torch": torch.softmax(loaded.logits(x), 1),
                 "onnx": torch.softmax(pipeline.load(out, backend="onnx").logits(x), 1),
                 "torchscript": torch.softmax(ts(x), 1)}
    for name, p in probs.items():
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-5, msg=name)
        for wrong, what in ((torch.softmax(plain, 1), "plain"), (torch.softmax((plain + flipped) / 2, 1), "no T"),
                            (torch.softmax(plain / t, 1), "no TTA")):
            assert float((p - wrong).abs().max()) > 1e-3, f"{name} equals the {what} model's probabilities"
    assert loaded.predict(images(data)[:1], topk=3)[0][0][1] == pytest.approx(float(expected[0].max()), abs=1e-6)


def test_weights_stay_plain_and_parity_covers_the_wrapper(calibrated):
    from safetensors import safe_open

    _, run, out = calibrated
    plain_model, _ = load_checkpoint(run, "best")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(plain_model.state_dict())  # no "model." prefix, no temperature tensor
    doc = json.loads((out / "model.json").read_text())
    assert set(doc["parity"]) == {"safetensors", "onnx", "torchscript"}
    assert all(r["max_abs_diff"] <= doc["export"]["tolerance"] for r in doc["parity"].values())
    assert doc["calibration"]["temperature"] == doc["temperature"]


def test_model_card_states_the_temperature_tta_and_ece(calibrated):
    _, run, out = calibrated
    card = (out / "MODEL_CARD.md").read_text()
    record = json.loads((run / "metrics.json").read_text())["calibration"]
    assert "not calibrated confidences" not in card
    assert f"T = {record['temperature']:.4f}" in card and "mirror image" in card
    assert f"val ECE {record['val']['before']['ece']:.4f} at T = 1 -> {record['val']['after']['ece']:.4f}" in card


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_csv_probabilities_are_the_softmax_of_the_wrapped_logits(calibrated, tmp_path, backend):
    data, _, out = calibrated
    paths = images(data)[:4] + images(data)[-2:]  # PNGs and the photos
    rows, csv_path = batch_predict.run(str(out), paths, backend=backend, topk=3, csv_path=str(tmp_path / "p.csv"))
    loaded = pipeline.load(out)  # torch: the wrapper built from model.json
    probs = torch.softmax(loaded.logits(torch.stack([loaded.preprocess(p) for p in paths])), 1).numpy()
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["path"] for r in table] == paths
    for row, p in zip(table, probs):
        got = {row[f"label_{i}"]: float(row[f"prob_{i}"]) for i in (1, 2, 3)}
        np.testing.assert_allclose([got[c] for c in CLASSES], p, rtol=0, atol=2e-6)
