"""TTA decision and temperature scaling (training/calibration.py), and a real run with both: best.json, metrics,
reports, and test metrics measured on the wrapped (shipped) model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conftest import CLASSES, make_imagefolder
from pipeline.data.augment import build_eval_transform
from pipeline.data.folder import ImageDataset, Split
from pipeline.model import checkpoint
from pipeline.model.checkpoint import load_checkpoint
from pipeline.train import train
from pipeline.training import calibration as C


def overconfident(n: int, t_true: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z): z is calibrated, z * t_true is over-confident by exactly t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 4))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in p])
    return z * t_true, labels


@pytest.mark.parametrize("t_true", [2.5, 0.5])
def test_fit_temperature_recovers_a_known_temperature(t_true):
    logits, labels = overconfident(4000, t_true)
    t = C.fit_temperature(logits, labels)
    assert t == pytest.approx(t_true, rel=0.08)
    assert C.nll(logits, labels, t) < C.nll(logits, labels, 1.0)
    for other in (t * 0.9, t * 1.1):  # a minimum, not merely an improvement
        assert C.nll(logits, labels, t) <= C.nll(logits, labels, other)
    assert C.calibration_metrics(logits, labels, t)["ece"] < C.calibration_metrics(logits, labels)["ece"]


def test_fit_temperature_on_tiny_or_degenerate_val_sets():
    separable = np.array([[3.0, 0.0], [0.0, 2.0]]), np.array([0, 1])  # NLL keeps falling as T -> 0
    assert C.fit_temperature(*separable) == pytest.approx(C.T_RANGE[0], rel=1e-3)
    wrong = np.array([[3.0, 0.0], [0.0, 2.0]]), np.array([1, 0])  # NLL keeps falling as T -> infinity
    assert C.fit_temperature(*wrong) == pytest.approx(C.T_RANGE[1], rel=1e-3)
    one = np.array([[2.0, 0.0, 0.0]]), np.array([1])
    assert C.T_RANGE[0] <= C.fit_temperature(*one) <= C.T_RANGE[1]
    assert C.fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0
    assert C.fit_temperature(np.array([[np.nan, 0.0]]), np.array([0])) == 1.0


def test_ece_nll_brier_on_hand_computed_cases():
    logits = np.log(np.array([[0.9, 0.1], [0.3, 0.7]]))  # softmax gives back these probabilities
    labels = np.array([0, 0])  # first right at confidence 0.9, second wrong at confidence 0.7
    m = C.calibration_metrics(logits, labels)
    assert m["ece"] == pytest.approx(0.5 * (1 - 0.9) + 0.5 * (0.7 - 0))
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.3)) / 2)
    assert m["brier"] == pytest.approx(((0.1 ** 2 + 0.1 ** 2) + (0.7 ** 2 + 0.7 ** 2)) / 2)

    same_bin = np.log(np.array([[0.9, 0.1], [0.1, 0.9]])), np.array([0, 0])  # one bin: accuracy 0.5, conf 0.9
    assert C.calibration_metrics(*same_bin)["ece"] == pytest.approx(0.4)

    t = 2.0  # softmax(logits / T): [e^1, e^0] / (e^1 + 1)
    p = math.e / (math.e + 1)
    m = C.calibration_metrics(np.array([[2.0, 0.0]]), np.array([1]), temperature=t)
    assert m["nll"] == pytest.approx(-math.log(1 - p))
    assert m["brier"] == pytest.approx(2 * p ** 2) and m["ece"] == pytest.approx(p)
    bins = C.reliability_bins(np.array([[2.0, 0.0]]), np.array([1]), t)
    assert bins["count"].sum() == 1 and bins["count"][int(np.ceil(p * 15)) - 1] == 1 and len(bins["edges"]) == 16


def test_ece_floor_is_what_a_calibrated_model_scores_from_sampling_alone():
    """Labels drawn from the model's own probabilities (calibrated by construction): its measured ECE sits at the
    floor, which shrinks as the split grows; an over-confident model is far above it."""
    for n in (150, 600):  # one split's ECE is noisy: averaged over 20 splits it matches the floor
        runs = [C.calibration_metrics(*overconfident(n, 1.0, seed=seed)) for seed in range(20)]
        measured, floor = (float(np.mean([m[k] for m in runs])) for k in ("ece", "ece_floor"))
        assert 0 < floor < 0.12 and measured == pytest.approx(floor, rel=0.25)
    small, large = (C.calibration_metrics(*overconfident(n, 1.0))["ece_floor"] for n in (150, 4000))
    assert large < small / 3  # about 1/sqrt(n): 5.2x from 150 to 4000 images
    assert C.ece_floor(np.ones(50)) == 0.0  # certain and always right: no sampling noise
    hot = C.calibration_metrics(*overconfident(4000, 3.0))
    assert hot["ece"] > 5 * hot["ece_floor"]


LABELS = np.array([0, 1, 2, 0, 1, 2])
PLAIN = np.eye(3)[[0, 1, 2, 1, 2, 0]] * 2.0  # the last three wrong: accuracy 0.5


@pytest.mark.parametrize("monitor", ["accuracy", "balanced_accuracy", "macro_f1", "loss"])
def test_decide_tta_auto_keeps_the_flip_only_when_it_helps(monitor):
    fixing = np.eye(3)[LABELS] * 6.0  # averaged with PLAIN: every image right
    helps = C.decide_tta("auto", PLAIN, fixing, LABELS, monitor)
    assert helps["kept"] and helps["views"] == ["identity", "hflip"] and helps["monitor"] == monitor
    better = helps["val"]["tta"] < helps["val"]["plain"] if monitor == "loss" else \
        helps["val"]["tta"] > helps["val"]["plain"]
    assert better
    breaking = np.eye(3)[(LABELS + 1) % 3] * 6.0  # averaged: every image wrong
    hurts = C.decide_tta("auto", PLAIN, breaking, LABELS, monitor)
    assert not hurts["kept"] and hurts["views"] == ["identity"]
    same = C.decide_tta("auto", PLAIN, PLAIN, LABELS, monitor)  # equal is not strictly better
    assert not same["kept"] and same["val"]["tta"] == same["val"]["plain"]
    assert C.decide_tta("flip", PLAIN, breaking, LABELS, monitor)["kept"]  # flip: always
    off = C.decide_tta("off", PLAIN, fixing, LABELS, monitor)
    assert not off["kept"] and off["views"] == ["identity"] and off["val"] is None


def test_decide_tta_on_loss_compares_nll_not_accuracy():
    sharper = PLAIN * 3  # averaged: the same predictions, more confident, the wrong ones too -> higher NLL
    flat = np.zeros_like(PLAIN)  # averaged: the same predictions, less confident -> lower NLL here
    assert not C.decide_tta("auto", PLAIN, flat, LABELS, "accuracy")["kept"]
    assert C.decide_tta("auto", PLAIN, flat, LABELS, "loss")["kept"]
    assert not C.decide_tta("auto", PLAIN, sharper, LABELS, "loss")["kept"]


def test_both_off_costs_nothing_and_changes_nothing(cfg_factory, tmp_path):
    cfg = cfg_factory("trainer.calibrate=false")
    assert cfg.trainer.tta == "off" and cfg_factory().trainer.calibrate is True  # the defaults: TTA off, calibrated

    def no_loader():
        raise AssertionError("a val pass with trainer.tta=off")

    best_val = (PLAIN, LABELS)
    record, out = C.calibrate_run(cfg.trainer, tmp_path, best_val, no_loader, torch.device("cpu"), None)
    assert record is None and out is best_val and list(tmp_path.iterdir()) == []


def test_calibration_alone_reuses_the_val_logits(cfg_factory, tmp_path):
    """trainer.calibrate without TTA: no val pass; the temperature is fitted on the fit's val logits."""
    meta = {"arch": "test_efficientnet", "num_classes": 3, "class_names": CLASSES, "epoch": 2,
            "preprocessing": {"input_size": [3, 8, 8], "mean": [0] * 3, "std": [1] * 3, "interpolation": "bilinear",
                              "crop_pct": 1.0}}
    checkpoint.save_checkpoint(tmp_path, "best", timm.create_model("test_efficientnet", num_classes=3), meta)
    logits, labels = overconfident(600, 3.0)
    cfg = cfg_factory("trainer.calibrate=true")
    record, (out, out_labels) = C.calibrate_run(cfg.trainer, tmp_path, (logits, labels), None, torch.device("cpu"),
                                                None)
    t = record["temperature"]
    assert t == C.fit_temperature(logits, labels) and t > 2 and record["tta"]["views"] == ["identity"]
    np.testing.assert_allclose(out, logits / t, rtol=1e-6)
    assert out_labels is labels and record["val"]["after"]["nll"] < record["val"]["before"]["nll"]
    assert json.loads((tmp_path / "best.json").read_text()) == {**meta, "tta": ["identity"], "temperature": t}


def run_cfg(cfg_factory, root: Path, *extra: str):
    return cfg_factory("dataset=folder", f"dataset.root={root}", "backbone=tiny", "backbone.input_size=64", *extra)


def test_run_with_flip_and_temperature_records_and_applies_both(tiny_folder, cfg_factory):
    make_imagefolder(tiny_folder, {c: 3 for c in CLASSES}, "test", offset=900)
    cfg = run_cfg(cfg_factory, tiny_folder, "strategy=finetune", "trainer.epochs=2", "trainer.max_train_batches=0",
                  "optim.lr=0.03", "trainer.tta=flip", "trainer.calibrate=true")  # lr 0.01: T 1.05, too near 1
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    record = metrics["calibration"]
    t = record["temperature"]
    meta = json.loads((run / "best.json").read_text())
    assert meta["tta"] == ["identity", "hflip"] and meta["temperature"] == t
    assert meta["config"]["trainer"]["tta"] == "flip" and meta["epoch"] == metrics["best_epoch"]  # other keys kept
    assert record["tta"]["kept"] and abs(t - 1) > 0.05 and set(record) >= {"val", "test"}
    assert record["val"]["after"]["nll"] <= record["val"]["before"]["nll"] + 1e-9
    assert json.loads((run / "metrics.json").read_text())["calibration"]["temperature"] == t
    for name in ("reliability_val.png", "reliability_test.png"):
        assert (run / name).stat().st_size > 1000, name
    summary = (run / "summary.md").read_text()
    assert "## Calibration" in summary and f"{t:.4f}" in summary and "| test |" in summary.split("## Calibration")[1]
    floor = record["test"]["after"]["ece_floor"]
    assert 0 < floor < 1 and f"test {floor:.4f}" in summary.split("ECE floor")[1]

    # the test metrics are those of the wrapped model: mean of both views, divided by T
    model, _ = load_checkpoint(run, "best")
    paths = sorted(str(p) for p in (tiny_folder / "test").rglob("*.png"))
    labels = np.array([CLASSES.index(Path(p).parent.name) for p in paths])
    dataset = ImageDataset(Split(paths, list(labels), CLASSES), build_eval_transform(meta["preprocessing"]))
    x = torch.stack([dataset[i][0] for i in range(len(paths))])
    with torch.no_grad():
        plain, flipped = model(x).numpy(), model(torch.flip(x, dims=[3])).numpy()
    shipped = (plain + flipped) / 2 / t
    assert metrics["test"]["loss"] == pytest.approx(C.nll(shipped, labels), rel=1e-4)
    assert metrics["test"]["loss"] != pytest.approx(C.nll(plain, labels), rel=1e-3)
    assert metrics["test"]["loss"] != pytest.approx(C.nll(shipped * t, labels), rel=1e-3)
    assert record["test"]["after"]["nll"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)
    assert record["test"]["before"]["nll"] == pytest.approx(C.nll(shipped * t, labels), rel=1e-4)
    assert metrics["test"]["accuracy"] == pytest.approx(float((shipped.argmax(1) == labels).mean()))


def test_cached_probe_run_decides_tta_on_its_full_model(tiny_folder, cfg_factory):
    """The cached linear probe's `best` is a full model too: trainer.tta=auto decides on it the same way."""
    cfg = run_cfg(cfg_factory, tiny_folder, "strategy=linear_probe", "features.cached=true", "trainer.epochs=3",
                  "trainer.tta=auto", "trainer.calibrate=true")
    metrics = train(cfg)
    record, meta = metrics["calibration"], json.loads((Path(cfg.output_dir) / "best.json").read_text())
    assert metrics["features"]["cached"] and record["tta"]["mode"] == "auto" and set(record["tta"]["val"]) == {
        "plain", "tta"}
    assert meta["tta"] == record["tta"]["views"] and meta["temperature"] == record["temperature"]
    assert "test" not in record and (Path(cfg.output_dir) / "reliability_val.png").is_file()
