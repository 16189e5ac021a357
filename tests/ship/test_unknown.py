"""The "unknown" answer end to end (trainer.ood; model/ood.py, training/ood_fit.py): fitted at the end of a real
run, stored in best, exported, and applied the same by pipeline.load (torch and ONNX), the TorchScript file and
make predict, which marks such images UNKNOWN and still gives the top-k."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
from conftest import compose_cfg, write_tiny_folder
from pipeline.errors import ModelFileError
from pipeline.model import meta_check, ood
from pipeline.ship import batch_predict
from pipeline.ship.saving import export_run
from pipeline.train import train


def _odd_images(folder: Path, n: int = 6) -> list[str]:
    """Images unlike the colour squares the model saw: grey stripes and checkerboards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        grid = (np.indices((40, 40)).sum(0) // (2 + i) % 2 * 255).astype(np.uint8)
        path = folder / f"odd_{i}.png"
        Image.fromarray(np.stack([grid] * 3, -1)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def unknown_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, run, export): a tiny fine-tune with 24 val images (the rule needs 20), exported in every format."""
    base = tmp_path_factory.mktemp("unknown")
    data = write_tiny_folder(base / "tiny", val={"blue": 8, "green": 8, "red": 8})
    cfg = compose_cfg([f"output_dir={base / 'run'}", f"data_dir={base / 'data'}", "trainer=smoke", "dataset=folder",
                       f"dataset.root={data}", "backbone=tiny", "backbone.input_size=64", "strategy=finetune",
                       "trainer.epochs=2", "trainer.max_train_batches=0", "optim.lr=0.01", "trainer.tta=flip"])
    train(cfg)
    return data, base / "run", export_run(base / "run", base / "export", formats=["safetensors", "onnx", "torchscript"],
                                          int8=True, int8_max_drop=100.0)  # int8 kept whatever it scores


def _batch(model, paths):
    return torch.stack([model.preprocess(p) for p in paths])


def test_the_run_fits_a_threshold_that_keeps_95_percent_of_val(unknown_run):
    _, run, export = unknown_run
    record = json.loads((run / "best.json").read_text())[ood.KEY]
    assert record["score"] == "knn" and record["k"] == 10 and record["keep"] == 0.95
    assert record["train_images"] == 36 and record["val_images"] == 24
    assert record["val_flagged"] <= 0.05 + 1 / 24
    assert json.loads((run / "metrics.json").read_text())[ood.KEY] == record
    doc = json.loads((export / "model.json").read_text())
    assert doc[ood.KEY] == record and doc["onnx"]["ood_output_name"] == "ood_score"
    assert "Unknown images" in (export / "MODEL_CARD.md").read_text()
    assert "unknown images: cosine similarity" in (run / "summary.md").read_text()


def test_every_backend_scores_alike_and_flags_odd_images(unknown_run, tmp_path):
    data, _, export = unknown_run
    val = sorted(str(p) for p in (data / "val").rglob("*.png"))
    odd = _odd_images(tmp_path / "odd")
    torch_model, onnx_model = pipeline.load(export), pipeline.load(export, backend="onnx")
    x = _batch(torch_model, val + odd)
    logits, scores = torch_model.logits_and_scores(x)
    onnx_logits, onnx_scores = onnx_model.logits_and_scores(x)
    assert torch.allclose(logits, torch_model.logits(x), atol=1e-5)  # the score pass is the classifier's own pass
    assert torch.allclose(onnx_logits, logits, atol=1e-3)
    assert torch.allclose(onnx_scores, scores, rtol=1e-3, atol=1e-2)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)
        ts_logits, ts_scores = torch.jit.load(str(export / "model.ts"))(x)
    assert torch.allclose(ts_scores, scores, rtol=1e-3, atol=1e-2) and torch.allclose(ts_logits, logits, atol=1e-3)
    flags = torch_model.unknown(scores)
    assert flags == onnx_model.unknown(onnx_scores)
    assert np.mean(flags[:len(val)]) <= 0.1 and all(flags[len(val):])  # val kept, every odd image unknown
    _, int8_scores = pipeline.load(export, backend="onnx-int8").logits_and_scores(x)  # the graph's second output
    assert int8_scores.shape == scores.shape and all(torch_model.unknown(int8_scores)[len(val):])
    rows = torch_model.classify(val[:1] + odd[:1], topk=2)
    assert [r["unknown"] for r in rows] == [flags[0], True] and all(len(r["top"]) == 2 for r in rows)
    assert rows[1]["ood_score"] == pytest.approx(float(scores[len(val)]), rel=1e-4)


def test_predict_marks_unknown_images_and_still_gives_the_top_k(unknown_run, tmp_path, capsys):
    data, _, export = unknown_run
    known = sorted((data / "val" / "red").glob("*.png"))[0]
    images = tmp_path / "images"
    _odd_images(images, 1)
    (images / known.name).write_bytes(known.read_bytes())
    rows, out = batch_predict.run(str(export), [str(images)], backend="onnx", topk=2, csv_path=str(tmp_path / "p.csv"))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["odd_0.png"]["unknown"] and len(by_name["odd_0.png"]["top"]) == 2
    assert not by_name[known.name]["unknown"] and len(by_name[known.name]["top"]) == 2
    printed = capsys.readouterr()
    assert "odd_0.png: UNKNOWN" in printed.out and f"{known.name}: UNKNOWN" not in printed.out
    assert "1 unknown" in printed.err
    table = {Path(r["path"]).name: r for r in csv.DictReader(open(out))}
    assert table["odd_0.png"]["unknown"] == "true" and table[known.name]["unknown"] == "false"
    assert float(table["odd_0.png"]["ood_score"]) < float(table[known.name]["ood_score"])


def test_a_malformed_rule_is_refused_in_one_line(unknown_run):
    _, _, export = unknown_run
    doc = json.loads((export / "model.json").read_text())
    with pytest.raises(ModelFileError, match="ood.threshold"):
        meta_check.check_meta({**doc, ood.KEY: {**doc[ood.KEY], "threshold": "high"}}, "model.json")
    with pytest.raises(ModelFileError, match="ood tensors"):
        ood.score_module(doc[ood.KEY], {"bank": torch.zeros(30, 5)}, "x")


def test_with_ood_off_there_is_no_rule_and_no_unknown_column(tmp_path):
    data = write_tiny_folder(tmp_path / "tiny", val={"blue": 8, "green": 8, "red": 8})
    cfg = compose_cfg([f"output_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}", "trainer=smoke",
                       "dataset=folder", f"dataset.root={data}", "backbone=tiny", "backbone.input_size=64",
                       "strategy=finetune", "trainer.ood=off", "audit.invariance_images=0"])
    train(cfg)
    assert json.loads((tmp_path / "run" / "best.json").read_text())[ood.KEY] == {"skipped": "trainer.ood=off"}
    rows, out = batch_predict.run(str(tmp_path / "run"), [str(data / "val" / "red")], csv_path=str(tmp_path / "p.csv"))
    assert "unknown" not in rows[0] and "unknown" not in open(out).readline()
