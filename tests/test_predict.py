"""Predict CLI (pipeline/predict.py): top-k with class names, CSV, broken images, ONNX backend, user errors."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline import predict
from test_export import CLASSES, train_and_export

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return train_and_export(tmp_path_factory.mktemp("predict"), ["safetensors", "onnx"])


@pytest.fixture
def folder(exported, tmp_path) -> Path:
    """Three real images (one in a subfolder), a broken .jpg and a text file."""
    data, _, _ = exported
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.copy(data / "val/red/red_0.png", images / "red_0.png")
    shutil.copy(data / "val/blue/blue_1.png", images / "blue_1.png")
    shutil.copy(data / "val/green/green_2.png", images / "sub" / "green_2.png")
    (images / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (images / "notes.txt").write_text("not an image, not reported")
    return images


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_cli_reports_broken_image_and_predicts_the_rest(exported, folder, tmp_path):
    _, _, out = exported
    proc = subprocess.run([sys.executable, "-m", "pipeline.predict", str(out), str(folder), "--topk", "2",
                           "--csv", str(tmp_path / "pred.csv")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    good = sorted(str(p) for p in folder.rglob("*.png"))
    expected = pipeline.load(out).predict(good, topk=2)
    printed = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert sorted(printed) == good
    for path, top in zip(good, expected):
        assert printed[path] == " | ".join(f"{name} {p:.3f}" for name, p in top)
    assert "broken.jpg: UNREADABLE" in proc.stderr and "3 image(s) predicted, 1 unreadable" in proc.stderr
    rows = {r["path"]: r for r in read_csv(tmp_path / "pred.csv")}
    assert sorted(rows) == sorted(good + [str(folder / "broken.jpg")])
    assert rows[str(folder / "broken.jpg")]["label_1"] == "" and rows[str(folder / "broken.jpg")]["error"]
    for path, top in zip(good, expected):
        assert [rows[path]["label_1"], rows[path]["label_2"]] == [top[0][0], top[1][0]]
        assert float(rows[path]["prob_1"]) == pytest.approx(top[0][1], abs=1e-6) and rows[path]["error"] == ""


def test_onnx_backend_gives_the_same_predictions(exported, folder, tmp_path, capsys):
    _, _, out = exported
    torch_rows, _ = predict.run(str(out), [str(folder)], topk=3, csv_path=str(tmp_path / "t.csv"))
    onnx_rows, _ = predict.run(str(out), [str(folder)], backend="onnx", topk=3, csv_path=str(tmp_path / "o.csv"))
    assert [r["path"] for r in torch_rows] == [r["path"] for r in onnx_rows]
    for t, o in zip(torch_rows, onnx_rows):
        assert ("error" in t) == ("error" in o)
        if "top" in t:
            assert [c for c, _ in t["top"]] == [c for c, _ in o["top"]]
            assert [p for _, p in t["top"]] == pytest.approx([p for _, p in o["top"]], abs=1e-5)
            assert sorted(c for c, _ in t["top"]) == CLASSES  # topk=3 of 3 classes


def test_single_file_and_topk_clamped_to_class_count(exported, tmp_path):
    data, _, out = exported
    image = str(data / "val/red/red_1.png")
    rows, csv_path = predict.run(str(out), [image], topk=10, csv_path=str(tmp_path / "one.csv"))
    assert len(rows) == 1 and len(rows[0]["top"]) == len(CLASSES)
    assert list(read_csv(csv_path)[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3",
                                           "error"]


@pytest.mark.parametrize("args, message", [
    (["{out}", "{missing}"], "Image path not found"),
    (["{out}", "{broken_only}"], "None of the 1 images could be read"),
    (["{out}", "{folder}", "--topk", "0"], "--topk=0 and --batch-size=32 must be >= 1"),
    (["{out}", "{folder}", "--backend", "tflite"], "argument --backend: invalid choice"),
    (["{tampered}", "{folder}"], "does not match the sha256 in model.json"),
    (["{nothing}", "{folder}"], "has no model.json (export dir) or best.json (run dir)"),
])
def test_user_errors_are_one_line_with_exit_code_2(exported, folder, tmp_path, capsys, args, message):
    _, _, out = exported
    tampered = Path(shutil.copytree(out, tmp_path / "tampered"))
    blob = bytearray((tampered / "model.safetensors").read_bytes())
    blob[-5] ^= 0x01
    (tampered / "model.safetensors").write_bytes(bytes(blob))
    (tmp_path / "broken_only").mkdir()
    (tmp_path / "broken_only" / "x.png").write_bytes(b"")
    (tmp_path / "nothing").mkdir()
    paths = {"out": out, "missing": tmp_path / "missing.jpg", "broken_only": tmp_path / "broken_only",
             "folder": folder, "tampered": tampered, "nothing": tmp_path / "nothing"}
    argv = [a.format(**paths) for a in args] + ["--csv", str(tmp_path / "p.csv")]
    with pytest.raises(SystemExit) as info:
        predict.main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and last.startswith("error: ") and message in last, last
