"""Predict CLI (pipeline/predict.py): top-k with class names, CSV, broken images, ONNX backend, user errors,
Grad-CAM overlays."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export import CLASSES

import pipeline
from pipeline.model import gradcam
from pipeline.ship import batch_predict

ROOT = Path(__file__).resolve().parents[2]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_onnx_backend_gives_the_same_predictions(exported, folder, tmp_path, capsys):
    _, _, out = exported
    torch_rows, _ = batch_predict.run(str(out), [str(folder)], topk=3, csv_path=str(tmp_path / "t.csv"))
    onnx_rows, _ = batch_predict.run(str(out), [str(folder)], backend="onnx", topk=3, csv_path=str(tmp_path / "o.csv"))
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
    rows, csv_path = batch_predict.run(str(out), [image], topk=10, csv_path=str(tmp_path / "one.csv"))
    assert len(rows) == 1 and len(rows[0]["top"]) == len(CLASSES)
    assert list(read_csv(csv_path)[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3",
                                           "error"]


def test_cam_writes_one_overlay_per_image_named_in_the_csv_and_the_output(exported, folder, tmp_path, capsys):
    _, _, out = exported
    rows, csv_path = batch_predict.run(str(out), [str(folder)], topk=2, csv_path=str(tmp_path / "p.csv"), cam=True,
                                       batch_size=2)  # a batch of its own for the last image: numbering carries on
    model = pipeline.load(out)
    printed = capsys.readouterr()
    table = {r["path"]: r for r in read_csv(csv_path)}
    assert list(read_csv(csv_path)[0])[-2:] == ["cam", "error"]
    good = [r for r in rows if "error" not in r]
    assert len(good) == 3 and table[str(folder / "broken.jpg")]["cam"] == ""
    assert sorted(Path(r["cam"]).name for r in good) == sorted(
        f"{i + 1:04d}_{Path(r['path']).stem}.png" for i, r in enumerate(rows) if "error" not in r)
    for row in good:
        cam = Path(row["cam"])
        assert cam.parent == tmp_path / "p_cam" and table[row["path"]]["cam"] == str(cam)
        assert f"{row['path']}: " in printed.out and f"cam: {cam}" in printed.out
        view = gradcam.model_view(model.preprocess(row["path"])[None], model.meta["preprocessing"])[0]
        with Image.open(cam) as image:
            overlay = np.asarray(image.convert("RGB"), np.int16)
        assert overlay.shape == view.shape and np.abs(overlay - view).mean() > 10  # a heat map over the model's view
    assert f"Grad-CAM overlays: {tmp_path / 'p_cam'}" in printed.err
