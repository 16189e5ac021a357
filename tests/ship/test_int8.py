"""The int8 ONNX model (ship/int8.py): statically quantized from model.onnx, checked against it on the run's val
images, kept only within export.int8_max_drop, recorded in model.json and the card, and run by backend=onnx-int8."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import pipeline
from conftest import ROOT, compose_cfg, write_tiny_folder
from pipeline.errors import ConfigError, MissingFileError
from pipeline.ship import int8
from pipeline.ship.saving import export_run
from pipeline.train import train


def _val_images(data) -> list[str]:
    return sorted(str(p) for p in (data / "val").rglob("*.png"))


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run) of a linear probe on the embedded ImageNet tf_efficientnet_lite0 (real weights: a model with
    skill, val balanced accuracy 1.0 on the tiny colour folder, so that a drop can show)."""
    base = tmp_path_factory.mktemp("int8")
    data = write_tiny_folder(base / "tiny")
    train(compose_cfg([f"output_dir={base / 'run'}", f"data_dir={base / 'data'}", "trainer=smoke", "dataset=folder",
                       f"dataset.root={data}", "backbone=tf_efficientnet_lite0", "backbone.input_size=64",
                       f"backbone.cache_dir={ROOT / 'data' / 'weights'}", "strategy=linear_probe",
                       "trainer.calibrate=false", "audit.invariance_images=0"]))
    return data, base / "run"


@pytest.fixture(scope="module")
def int8_export(probe_run) -> Path:
    """The probe exported with export.int8=true and the default int8_max_drop (0.5)."""
    _, run = probe_run
    return export_run(run, run.parent / "export", formats=["safetensors", "onnx"], int8=True)


def test_the_int8_file_is_a_quantized_graph_recorded_in_model_json(int8_export):
    doc = json.loads((int8_export / "model.json").read_text())
    q = doc["int8"]
    assert q["kept"] and q["file"] == int8.INT8_FILE and q["images"] == 12 and q["calibration_images"] == 36
    assert q["val"]["fp32"]["balanced_accuracy"] == 1.0 and q["top1_agreement"] >= 0.9 and q["drop_points"] <= 0.5
    assert int8.INT8_FILE in doc["files"] and doc["files"][int8.INT8_FILE]["sha256"]
    ops = {node.op_type for node in onnx.load(str(int8_export / int8.INT8_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ: int8 weights and activations in the graph
    assert "int8 ONNX" in (int8_export / "MODEL_CARD.md").read_text()


def test_backend_onnx_int8_runs_the_int8_file_and_agrees_as_recorded(probe_run, int8_export):
    data, _ = probe_run
    fp32, quantized = pipeline.load(int8_export, backend="onnx"), pipeline.load(int8_export, backend="onnx-int8")
    x = torch.stack([fp32.preprocess(p) for p in _val_images(data)])
    a, b = fp32.logits(x), quantized.logits(x)
    assert quantized.backend == "onnx-int8" and not torch.equal(a, b)  # another graph, not the fp32 one
    agreement = float((a.argmax(1) == b.argmax(1)).float().mean())
    recorded = json.loads((int8_export / "model.json").read_text())["int8"]["top1_agreement"]
    assert agreement == pytest.approx(recorded)  # the check ran on these 12 val images


def test_an_int8_model_that_drops_too_much_is_not_kept(probe_run, tmp_path, monkeypatch):
    """A quantization that ruins the model (every weight of the int8 file scaled to 0): the check sees the drop,
    the file is removed, model.json says why and backend=onnx-int8 says so in one line."""
    _, run = probe_run
    original = int8.quantize

    def ruin(fp32, out, calibration):
        model = onnx.load(str(fp32))
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT:
                values = onnx.numpy_helper.to_array(init) * 0
                init.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), init.name))
        ruined = out.with_name("ruined.onnx")
        onnx.save(model, str(ruined))
        original(ruined, out, calibration)
        ruined.unlink()

    monkeypatch.setattr(int8, "quantize", ruin)
    out = export_run(run, tmp_path / "export", formats=["safetensors", "onnx"], int8=True)
    q = json.loads((out / "model.json").read_text())["int8"]
    assert not q["kept"] and q["drop_points"] > 0.5 and "export.int8_max_drop=0.5" in q["why"]
    assert not (out / int8.INT8_FILE).exists() and int8.INT8_FILE not in json.loads(
        (out / "model.json").read_text())["files"]
    with pytest.raises(MissingFileError, match=r"has no int8 model \(balanced accuracy .* points below fp32") as e:
        pipeline.load(out, backend="onnx-int8")
    assert "\n" not in str(e.value)


def test_int8_off_or_without_onnx_writes_no_int8_file(exported, tmp_path):
    _, run, _ = exported  # the shared tiny run: no int8 file is made here
    off = export_run(run, tmp_path / "off", int8=False)
    assert "int8" not in json.loads((off / "model.json").read_text()) and not (off / int8.INT8_FILE).exists()
    no_onnx = export_run(run, tmp_path / "no_onnx", formats=["safetensors"], int8=True)
    assert "add onnx to export.formats" in json.loads((no_onnx / "model.json").read_text())["int8"]["why"]
    with pytest.raises(ConfigError, match="export.int8='maybe' is not true or false"):
        export_run(run, tmp_path / "bad", int8="maybe")


def test_the_verdict_is_the_balanced_accuracy_drop_against_the_limit():
    labels = np.array([0, 0, 0, 1])
    right = np.eye(2)[labels]
    one_wrong = np.eye(2)[[0, 0, 0, 0]]  # the only class-1 image missed: balanced accuracy 1.0 -> 0.5
    kept, dropped = int8.compare(right, right, labels, 0.5), int8.compare(right, one_wrong, labels, 0.5)
    assert kept["kept"] and kept["drop_points"] == 0 and kept["top1_agreement"] == 1.0
    assert not dropped["kept"] and dropped["drop_points"] == 50.0 and dropped["top1_agreement"] == 0.75


def test_a_quantization_that_fails_leaves_the_fp32_export_and_says_why(probe_run, tmp_path, monkeypatch):
    _, run = probe_run

    def broken(fp32, out, calibration):
        raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr(int8, "quantize", broken)
    out = export_run(run, tmp_path / "export", formats=["safetensors", "onnx"], int8=True)
    q = json.loads((out / "model.json").read_text())["int8"]
    assert not q["kept"] and "quantization failed (RuntimeError: Incomplete symbolic" in q["why"]
    assert (out / "model.onnx").is_file() and not (out / int8.INT8_FILE).exists()
