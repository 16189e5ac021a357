"""Export (pipeline/export.py) and loading (pipeline/ship/loading.py): formats, parity, round trip, safe loading."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
from conftest import CLASSES
from pipeline.data.augment import build_eval_transform
from pipeline.data.folder import ImageDataset, Split
from pipeline.errors import MissingFileError
from pipeline.model.checkpoint import load_checkpoint
from pipeline.ship import loading, saving
from pipeline.ship.loading import ModelFileError

ROOT = Path(__file__).resolve().parents[2]



def val_images(data: Path) -> list[str]:
    return sorted(str(p) for p in (data / "val").rglob("*.png"))


def training_time_logits(run: Path, paths: list[str]) -> torch.Tensor:
    """The checkpoint as training loads it, fed through training's own dataset + eval transform."""
    model, meta = load_checkpoint(run, "best")
    dataset = ImageDataset(Split(paths, [0] * len(paths), CLASSES), build_eval_transform(meta["preprocessing"]))
    with torch.no_grad():
        return model(torch.stack([dataset[i][0] for i in range(len(paths))]))


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_export_writes_every_format_checked_against_pytorch(exported):
    data, run, out = exported
    for name in ("model.safetensors", "model.json", "model.onnx", "model.ts", "MODEL_CARD.md"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "model.json").read_text())
    assert doc["arch"] == "test_efficientnet" and doc["class_names"] == CLASSES and doc["num_classes"] == 3
    assert set(doc["preprocessing"]) >= {"input_size", "mean", "std", "interpolation", "crop_pct"}
    assert doc["config"]["dataset"]["root"] == str(data) and "torch" in doc["versions"]
    assert doc["metrics"]["val"]["accuracy"] == json.loads((run / "best.json").read_text())["val_metrics"]["accuracy"]
    assert set(doc["parity"]) == {"safetensors", "onnx", "torchscript"}
    for fmt, result in doc["parity"].items():
        assert result["max_abs_diff"] <= doc["export"]["tolerance"], fmt
        assert result["batch_sizes"] == [12, 1] and result["top1_agreement"] == 1.0, fmt
    assert doc["parity"]["safetensors"]["max_abs_diff"] == 0.0  # same weights, same preprocessing, same torch
    assert doc["torchscript"]["method"] in ("script", "trace")
    for name, entry in doc["files"].items():
        assert entry["sha256"] == loading.file_sha256(out / name) and entry["bytes"] == (out / name).stat().st_size
    card = (out / "MODEL_CARD.md").read_text()
    for text in ("| red | 12 | 4 |", "## Metrics", "## Intended use", "## Limitations", "| onnx | `model.onnx`",
                 "blue, green, red", "max abs logit diff"):
        assert text in card, text


def test_run_without_tta_or_calibration_exports_the_plain_model(exported):
    """trainer.tta=off, trainer.calibrate=false: no keys, no wrapper, the card says so."""
    _, run, out = exported
    doc = json.loads((out / "model.json").read_text())
    assert not {"tta", "temperature", "calibration"} & set(doc)
    assert not {"tta", "temperature"} & set(json.loads((run / "best.json").read_text()))
    assert type(pipeline.load(out).model).__name__ != "CalibratedClassifier"
    assert "not calibrated confidences" in (out / "MODEL_CARD.md").read_text()
    assert not list(run.glob("reliability_*.png"))
    assert "calibration" not in json.loads((run / "metrics.json").read_text())


def test_safetensors_holds_only_the_model_tensors(exported):
    from safetensors import safe_open

    _, run, out = exported
    model, _ = load_checkpoint(run, "best")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())


def test_round_trip_load_predicts_exactly_like_the_training_time_model(exported):
    data, run, out = exported
    paths = val_images(data)
    loaded = pipeline.load(out)
    logits = loaded.logits(torch.stack([loaded.preprocess(p) for p in paths]))
    torch.testing.assert_close(logits, training_time_logits(run, paths), rtol=0, atol=0)
    labels = np.array([CLASSES.index(Path(p).parent.name) for p in paths])
    accuracy = float((logits.argmax(1).numpy() == labels).mean())
    assert accuracy == pytest.approx(loaded.meta["metrics"]["val"]["accuracy"])
    top = loaded.predict(paths[:2], topk=2)
    assert [t[0][0] for t in top] == [CLASSES[i] for i in logits[:2].argmax(1)]
    assert all(len(t) == 2 and t[0][1] >= t[1][1] for t in top)
    array = np.asarray(Image.open(paths[0]).convert("RGB"))  # an RGB array works like its file
    assert torch.equal(loaded.preprocess(array), loaded.preprocess(paths[0]))


def test_onnx_backend_matches_pytorch_at_two_batch_sizes(exported):
    data, run, out = exported
    paths = val_images(data)
    reference = training_time_logits(run, paths)
    onnx = pipeline.load(out, backend="onnx")
    batch = torch.stack([onnx.preprocess(p) for p in paths])
    for x, ref in ((batch, reference), (batch[:1], reference[:1]), (batch[:5], reference[:5])):
        got = onnx.logits(x)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_file_matches_pytorch(exported):
    data, run, out = exported
    paths = val_images(data)
    ts = torch.jit.load(str(out / "model.ts"), map_location="cpu")
    x = torch.stack([pipeline.load(out).preprocess(p) for p in paths])
    with torch.no_grad():
        torch.testing.assert_close(ts(x), training_time_logits(run, paths), rtol=0, atol=1e-5)


def test_load_imports_no_hydra_no_training_code(exported):
    data, _, out = exported
    code = f"""
import json, sys
import pipeline
light = sorted(m for m in ("torch", "hydra", "omegaconf") if m in sys.modules)
m = pipeline.load({str(out)!r})
o = pipeline.load({str(out)!r}, backend="onnx")
print(m.predict([{val_images(data)[0]!r}])[0][0][0], o.predict([{val_images(data)[0]!r}])[0][0][0])
training = ("pipeline.train", "pipeline.config", "pipeline.data.folder", "pipeline.training.loop", "pipeline.transfer.optim",
            "pipeline.training.loss", "pipeline.model.freezing", "pipeline.model.backbone", "pipeline.export")
# model/checkpoint.py is the one reader of weights and model JSON, shared with training: allowed, and light
bad = [n for n in sys.modules if n.split(".")[0] in ("hydra", "omegaconf", "sklearn") or n in training]
print(json.dumps({{"after_import": light, "bad": bad}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, last = proc.stdout.strip().splitlines()[-2:]
    assert first.split()[0] in CLASSES and first.split()[0] == first.split()[1]
    result = json.loads(last)
    assert result == {"after_import": [], "bad": []}


def test_loading_never_unpickles(exported, monkeypatch):
    data, _, out = exported

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert pipeline.load(out).predict(val_images(data)[:1])[0][0][0] in CLASSES
    assert pipeline.load(out, backend="onnx").predict(val_images(data)[:1])[0][0][0] in CLASSES


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pth_state_dict_is_read_with_weights_only(exported, tmp_path):
    data, run, out = exported
    model, _ = load_checkpoint(run, "best")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    x = pipeline.load(out).preprocess(val_images(data)[0])[None]
    with_pth = pipeline.load(out, weights=tmp_path / "weights.pth")
    torch.testing.assert_close(with_pth.logits(x), pipeline.load(out).logits(x), rtol=0, atol=0)

    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"w": _Evil(marker)}, protocol=2))
    with pytest.raises(ModelFileError, match="weights_only=True"):
        pipeline.load(out, weights=tmp_path / "evil.pth")
    assert not marker.exists()


def test_truncated_or_modified_weights_fail_clearly(exported, tmp_path):
    _, _, out = exported
    truncated = copy_export(out, tmp_path / "truncated")
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        pipeline.load(truncated)

    modified = copy_export(out, tmp_path / "modified")
    (modified / "model.safetensors").write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    with pytest.raises(ModelFileError, match="sha256"):
        pipeline.load(modified)
    (modified / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="model.onnx"):
        pipeline.load(modified, backend="onnx")

    unlisted = copy_export(out, tmp_path / "unlisted")  # no sha256 to compare: the format check still catches it
    doc = json.loads((unlisted / "model.json").read_text())
    doc.pop("files")
    (unlisted / "model.json").write_text(json.dumps(doc))
    (unlisted / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        pipeline.load(unlisted)


@pytest.mark.parametrize("edit, message", [
    ({"num_classes": 5, "class_names": ["a", "b", "c", "d", "e"]}, r"num_classes=5\): shape mismatch: classifier"),
    ({"arch": "resnet18"}, r"arch=resnet18.*missing keys"),
    ({"arch": "not_a_timm_model"}, "not a model of the installed timm"),
    ({"class_names": ["a", "b"]}, "num_classes=3 but 2 class_names"),
    ({"preprocessing": {"input_size": [3, 8, 8]}}, "preprocessing.mean"),
])
def test_model_json_that_does_not_match_the_weights_fails_clearly(exported, tmp_path, edit, message):
    _, _, out = exported
    bad = copy_export(out, tmp_path / "bad")
    doc = {**json.loads((bad / "model.json").read_text()), **edit}
    (bad / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match=message) as info:
        pipeline.load(bad)
    assert "\n" not in str(info.value)


def test_parity_above_tolerance_fails_loudly_and_leaves_no_export(exported, tmp_path, monkeypatch):
    _, run, _ = exported
    original = loading.OnnxModel.scored
    monkeypatch.setattr(loading.OnnxModel, "scored", lambda self, x: (original(self, x)[0] + 0.01, None))
    with pytest.raises(saving.ExportError, match=r"Parity check failed.*'onnx'.*tolerance 0.001"):
        saving.export_run(run, tmp_path / "out", formats=["onnx"])
    assert list(tmp_path.iterdir()) == []  # neither the export dir nor its partial temp dir


def test_card_shows_the_confusion_image_only_when_the_run_has_one(exported, tmp_path):
    _, run, _ = exported
    run_copy = Path(shutil.copytree(run, tmp_path / "run"))
    for png in run_copy.glob("confusion_*.png"):
        png.unlink()
    out = saving.export_run(run_copy, tmp_path / "plain", formats=["safetensors"])
    assert "![confusion" not in (out / "MODEL_CARD.md").read_text() and not list(out.glob("confusion*"))
    Image.new("RGB", (20, 20), (200, 10, 10)).save(run_copy / "confusion_val.png")
    out = saving.export_run(run_copy, tmp_path / "with_image", formats=["safetensors"])
    assert "![confusion matrix](confusion_val.png)" in (out / "MODEL_CARD.md").read_text()
    assert (out / "confusion_val.png").read_bytes() == (run_copy / "confusion_val.png").read_bytes()
    again = saving.export_run(run_copy, tmp_path / "with_image", formats=["safetensors"])  # re-export replaces
    assert again == out and (out / "model.json").is_file()


def test_parity_images_come_from_the_runs_own_split(exported, tmp_path):
    """split.csv (written by every run) names the val images: the export uses them even when the config's
    dataset.root is gone, and names the fix when the images themselves are gone."""
    data, run, _ = exported
    moved = Path(shutil.copytree(run, tmp_path / "run"))
    meta = json.loads((moved / "best.json").read_text())
    meta["config"]["dataset"]["root"] = str(tmp_path / "gone")
    (moved / "best.json").write_text(json.dumps(meta))
    out = saving.export_run(moved, tmp_path / "from_split", formats=["safetensors"])
    assert "split.csv" in json.loads((out / "model.json").read_text())["dataset"]["parity_source"]
    gone = Path(shutil.copytree(data, tmp_path / "data_copy"))
    (moved / "split.csv").write_text((moved / "split.csv").read_text().replace(str(data), str(gone)))
    shutil.rmtree(gone)
    with pytest.raises(MissingFileError, match="or pass images=<folder of images>"):
        saving.export_run(moved, tmp_path / "out", formats=["safetensors"])
    out = saving.export_run(moved, tmp_path / "out", formats=["safetensors"], images=str(data / "val"))
    doc = json.loads((out / "model.json").read_text())
    assert doc["parity"]["safetensors"]["batch_sizes"] == [12, 1]
    assert "not available at export time" in (out / "MODEL_CARD.md").read_text()


def test_a_run_without_split_csv_is_re_split_as_it_was_trained(tmp_path):
    """Runs older than split.csv: the dataset is listed again with the run's own settings, the test fraction
    included, so the parity images are the val images training held out."""
    from conftest import compose_cfg, make_imagefolder
    from pipeline.data.build import build_data

    root = make_imagefolder(tmp_path / "data", {c: 12 for c in CLASSES})  # train/ only: val and test are drawn
    cfg = compose_cfg(["dataset=folder", f"dataset.root={root}", "dataset.test_fraction=0.25"])
    trained, _ = build_data(cfg.dataset, seed=cfg.seed)
    run_dir = tmp_path / "old_run"
    run_dir.mkdir()
    dataset = {k: cfg.dataset[k] for k in ("root", "train_split", "val_split", "test_split", "val_fraction",
                                          "test_fraction", "max_pixels", "min_per_class", "audit_workers")}
    again = saving.dataset_splits(run_dir, dataset, cfg.seed)
    assert trained.test is not None and again.val.paths == trained.val.paths
    assert again.test.paths == trained.test.paths
