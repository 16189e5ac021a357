"""Feature-extractor fast path: cache keys and hits, LogME, heads on cached features, exported-model parity."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import write_image
from pipeline.data.augment import build_eval_transform
from pipeline.data.folder import Split, list_split
from pipeline.errors import ConfigError, PipelineError
from pipeline.features.cache import Extraction, load_or_extract, weights_hash
from pipeline.features.heads import fit_logistic_head, fold_standardization, resolve_head, standardizer
from pipeline.ship import loading, saving
from pipeline.train import train
from pipeline.transfer.logme import logme_score

PREP = {"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
        "crop_pct": 0.875}


def _split(root: Path) -> Split:
    classes = ["blue", "green", "red"]
    paths, labels, _ = list_split(root / "train", classes)
    return Split(paths, labels, classes)


def _extract(model, split, cache_dir, transform=None):
    return load_or_extract(model, split, transform or build_eval_transform(PREP),
                           Extraction(torch.device("cpu"), cache_dir, batch_size=16),
                           key_parts={"arch": "test_efficientnet", "weights": weights_hash(model),
                                      "transform": repr(transform or build_eval_transform(PREP))})


def test_cache_hits_on_same_inputs_and_misses_on_any_change(tiny_folder, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    cache = tmp_path / "cache"
    first = _extract(model, _split(tiny_folder), cache)
    again = _extract(model, _split(tiny_folder), cache)
    assert not first["hit"] and again["hit"] and again["key"] == first["key"]
    assert torch.equal(first["features"], again["features"]) and torch.equal(first["labels"], again["labels"])

    keys = {first["key"]}
    write_image(tiny_folder / "train/red/new.png", (200, 30, 30), seed=77)  # file added
    added = _extract(model, _split(tiny_folder), cache)
    assert not added["hit"] and len(added["labels"]) == len(first["labels"]) + 1
    keys.add(added["key"])
    target = tiny_folder / "train/blue/blue_0.png"  # file modified (content and mtime)
    write_image(target, (0, 0, 0), seed=5)
    os.utime(target, ns=(1, 1))
    keys.add(_extract(model, _split(tiny_folder), cache)["key"])
    (tiny_folder / "train/green/green_0.png").unlink()  # file removed
    keys.add(_extract(model, _split(tiny_folder), cache)["key"])
    other_tf = build_eval_transform({**PREP, "input_size": (3, 48, 48)})  # transform changed
    changed = _extract(model, _split(tiny_folder), cache, other_tf)
    assert not changed["hit"]
    keys.add(changed["key"])
    assert len(keys) == 5
    with torch.no_grad():  # different weights -> different hash -> different key
        next(model.parameters()).add_(1.0)
    assert weights_hash(model) not in {json.loads(p.read_text())["key_parts"]["weights"] for p in cache.glob("*.json")}


def test_threaded_extraction_equals_the_dataloader_and_skips_a_broken_file(tiny_folder, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    split = _split(tiny_folder)
    broken = tiny_folder / "train/red/broken.png"
    broken.write_bytes(b"not a png")
    split = Split(split.paths + [str(broken)], split.labels + [2], split.classes)

    def run(workers):
        return load_or_extract(model, split, build_eval_transform(PREP),
                               Extraction(torch.device("cpu"), None, batch_size=5, num_workers=workers), key_parts={})

    threaded, loader = run(0), run(2)
    assert torch.equal(threaded["features"], loader["features"]) and torch.equal(threaded["index"], loader["index"])
    assert len(split) - 1 not in threaded["index"].tolist() and len(threaded["index"]) == len(split) - 1


def test_augmented_views_with_workers_repeat_per_seed_and_differ_between_seeds(tiny_folder):
    from pipeline.data.augment import TrainAugment, build_train_transform

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()

    def view(seed):
        tf = build_train_transform(PREP, TrainAugment(scale_min=0.3))
        return load_or_extract(model, _split(tiny_folder), tf, Extraction(torch.device("cpu"), None, batch_size=8,
                               num_workers=2), key_parts={"view": seed}, seed=seed)["features"]

    first, again, other = view(1), view(1), view(2)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # one image 16 times, 8 per batch: worker 0 makes batch 0, worker 1 batch 1; a stream copied into both
    # workers would give the two batches the same augmentations
    split = _split(tiny_folder)
    same = Split([split.paths[0]] * 16, [split.labels[0]] * 16, split.classes)
    feats = load_or_extract(model, same, build_train_transform(PREP, TrainAugment(scale_min=0.3)),
                            Extraction(torch.device("cpu"), None, batch_size=8, num_workers=2), key_parts={},
                            seed=3)["features"]
    assert not torch.allclose(feats[:8], feats[8:])


def test_logme_ranks_separating_features_above_random_ones():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    random = rng.normal(size=(400, 32))
    separating = random.copy()
    separating[:, :4] += 3 * np.eye(4)[labels]
    half = random.copy()
    half[:, :4] += 1 * np.eye(4)[labels]
    scores = [logme_score(f, labels) for f in (separating, half, random)]
    assert scores[0] > scores[1] > scores[2]
    assert logme_score(separating[:20], labels[:20]) > logme_score(random[:20], labels[:20])  # N < D


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_head_folded_into_a_linear_layer_gives_sklearns_probabilities(n_classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    y = rng.integers(0, n_classes, 120)
    x = rng.normal(3.0, 2.0, size=(120, 6)) + np.eye(n_classes, 6)[y] * 4
    mu, sigma = standardizer(x)
    head = fit_logistic_head((x - mu) / sigma, y, num_classes=n_classes, seed=0)
    w, b = fold_standardization(head["weight"], head["bias"], mu, sigma)
    ours = torch.softmax(torch.from_numpy(x @ w.T + b), 1).numpy()
    ref = LogisticRegression(C=head["C"], max_iter=1000).fit((x - mu) / sigma, y).predict_proba((x - mu) / sigma)
    assert np.allclose(ours, ref, atol=1e-3)


def _probe_cfg(cfg_factory, root, *extra):
    return cfg_factory("dataset=folder", f"dataset.root={root}", "backbone=tiny", "backbone.input_size=64",
                       "strategy=linear_probe", "trainer.epochs=4", "optim.lr=0.05", "features.head=linear", *extra)


@pytest.mark.parametrize("depths", ["[head]", "[1,head]"])
def test_cached_probe_predictions_equal_the_exported_full_model(tiny_folder, cfg_factory, tmp_path, depths):
    cfg = _probe_cfg(cfg_factory, tiny_folder, f"features.depths={depths}")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    info = json.loads((run / "features.json").read_text())
    assert info["cached"] and not info["extraction"]["train"]["hit"] and metrics["features"]["levels"] == info["levels"]
    cached_val = load_file(str(Path(cfg.features.cache_dir) / f"{info['extraction']['val']['key']}.safetensors"))
    weights = load_file(str(run / "best.safetensors"))
    w, b = (weights["classifier.weight"], weights["classifier.bias"]) if depths == "[head]" else \
        (weights["fc.weight"], weights["fc.bias"])
    cached_logits = (cached_val["features"] @ w.T + b) / json.loads((run / "best.json").read_text())["temperature"]
    out = saving.export_run(run, tmp_path / "export", formats=["safetensors", "onnx"])
    val_paths = [Split(*list_split(tiny_folder / "val", ["blue", "green", "red"])[:2], []).paths[i]
                 for i in cached_val["index"].tolist()]
    for backend in ("torch", "onnx"):
        model = loading.load(out, backend=backend)
        batch = torch.stack([model.preprocess(p) for p in val_paths])
        full = model.logits(batch)
        assert torch.allclose(full, cached_logits, atol=1e-4), backend
        assert torch.equal(full.argmax(1), cached_logits.argmax(1))
    confusion = np.loadtxt(run / "confusion_val.csv", delimiter=",", skiprows=1, usecols=range(1, 4))
    assert confusion.sum() == len(val_paths)


def test_second_run_hits_the_cache_and_gives_the_same_head(tiny_folder, cfg_factory, tmp_path):
    first = train(_probe_cfg(cfg_factory, tiny_folder, f"output_dir={tmp_path / 'a'}"))
    second = train(_probe_cfg(cfg_factory, tiny_folder, f"output_dir={tmp_path / 'b'}"))
    assert [second["features"]["extraction"][s]["hit"] for s in ("train", "val")] == [True, True]
    a, b = load_file(str(tmp_path / "a/best.safetensors")), load_file(str(tmp_path / "b/best.safetensors"))
    assert torch.equal(a["classifier.weight"], b["classifier.weight"])
    assert first["val"] == second["val"]


def test_depths_auto_picks_the_best_logme_level_and_views_add_rows(tiny_folder, cfg_factory):
    metrics = train(_probe_cfg(cfg_factory, tiny_folder, "features.depths=auto", "features.augmented_views=2",
                               "features.head=logistic"))
    info = metrics["features"]
    best = max(info["logme"], key=lambda k: info["logme"][k]["logme"])
    assert info["levels"] == [best] and len(info["logme"]) == 5 + 1  # test_efficientnet: 5 levels + head
    assert info["train_images"] == 3 * 36 and set(info["extraction"]) == {"train", "val", "view1", "view2"}
    assert info["extraction"]["view1"]["key"] != info["extraction"]["view2"]["key"] and info["C"] > 0


def test_extraction_workers_default_to_none_on_cpu_and_the_trainers_on_cuda():
    from pipeline.features.cached_fit import extraction_workers

    assert extraction_workers("auto", 2, torch.device("cpu")) == 0
    assert extraction_workers("auto", 2, torch.device("cuda")) == 2
    assert extraction_workers(3, 2, torch.device("cpu")) == 3


@pytest.mark.parametrize("overrides, message", [
    (["features.depths=[9]"], "features.depths=[9] is not valid"),
    (["features.head=svm"], "features.head='svm' is not valid"),
    (["strategy=finetune", "features.depths=[1,head]"], "needs the cached linear probe"),
    (["features.num_workers=-1"], "features.num_workers=-1 is not valid"),
    (["features.augmented_views=-2"], "features.augmented_views=-2 must be >= 0"),
])
def test_bad_feature_options_are_one_line_config_errors(tiny_folder, cfg_factory, overrides, message):
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "backbone.input_size=64",
                      "strategy=linear_probe", *overrides)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        train(cfg)


def _single_image_class(root: Path) -> Path:
    for name, color, n in (("blue", (20, 40, 200), 6), ("red", (200, 30, 30), 1)):
        for i in range(n):
            write_image(root / "train" / name / f"{i}.png", color, seed=i)
            write_image(root / "val" / name / f"{i}.png", color, seed=50 + i)
    return root


def test_logistic_head_with_a_single_image_class_is_a_config_error(tmp_path, cfg_factory):
    cfg = cfg_factory("dataset=folder", f"dataset.root={_single_image_class(tmp_path / 'small')}", "backbone=tiny",
                      "backbone.input_size=32", "strategy=linear_probe", "features.head=logistic")
    with pytest.raises(ConfigError, match=r"features.head=logistic needs at least 2 train images in every class .*"
                                          r"\{1: 1\}\); use features.head=linear"):
        train(cfg)


def test_head_auto_is_logistic_where_its_cv_can_run_else_linear(tmp_path, cfg_factory, tiny_folder):
    assert resolve_head("auto", np.array([0, 0, 1, 1, 2, 2]), 3) == "logistic"
    assert resolve_head("auto", np.array([0, 0, 1]), 3) == "linear"  # class 2 absent is fine; class 1 has one
    assert resolve_head("linear", np.array([0, 0, 1, 1]), 2) == "linear"
    common = ("dataset=folder", "backbone=tiny", "backbone.input_size=32", "strategy=linear_probe",
              "features.head=auto", "features.head_epochs=3")
    single = train(cfg_factory(*common, f"dataset.root={_single_image_class(tmp_path / 'small')}",
                               f"output_dir={tmp_path / 'single'}"))
    assert single["features"]["head"] == "linear" and len(single["history"]) == 3
    plenty = train(cfg_factory(*common, f"dataset.root={tiny_folder}", f"output_dir={tmp_path / 'plenty'}"))
    assert plenty["features"]["head"] == "logistic" and plenty["features"]["C"] > 0
    assert plenty["features"]["standardized"] and len(plenty["history"]) == 1


def test_a_split_with_no_decodable_image_is_a_one_line_error(tmp_path):
    broken = tmp_path / "val" / "red"
    broken.mkdir(parents=True)
    paths = []
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"<html>not an image</html>")
        paths.append(str(broken / f"{i}.png"))
    model = timm.create_model("test_efficientnet", num_classes=2)
    with pytest.raises(PipelineError, match=r"No image of the val split could be decoded \(3 file\(s\), e.g. .*0.png\);"
                                            " run `make audit`"):
        load_or_extract(model, Split(paths, [0, 0, 0], ["red", "blue"]), build_eval_transform(PREP),
                        Extraction(torch.device("cpu"), None), key_parts={"k": 1}, name="val")


def test_rank_scores_every_level_and_reports_a_backbone_it_cannot_build(tiny_folder, cfg_factory):
    from pipeline.rank import rank

    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "backbone.input_size=64",
                      "backbones=[test_efficientnet,not_a_timm_model]")
    result = rank(cfg)
    assert [r["level"] for r in result["rows"]] == ["0", "1", "2", "3", "4", "head"]
    assert all(np.isfinite(r["logme"]) and r["images"] == 36 and r["cache"] == "miss" for r in result["rows"])
    assert [s["backbone"] for s in result["skipped"]] == ["not_a_timm_model"]
    text = (Path(cfg.output_dir) / "rank.md").read_text()
    assert "| 1 | test_efficientnet |" in text and "not_a_timm_model" in text
    assert rank(cfg)["rows"][0]["cache"] == "hit"


def test_cached_head_trains_for_features_head_epochs_not_trainer_epochs(tiny_folder, cfg_factory):
    metrics = train(cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny",
                                "backbone.input_size=64", "strategy=linear_probe", "trainer.epochs=1",
                                "features.head_epochs=7", "features.head_patience=0", "features.head=linear"))
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 8))


def test_cached_head_stops_after_features_head_patience_epochs_without_gain(cfg_factory):
    from pipeline.features.cached_fit import HeadFit, head_training, train_head
    from pipeline.features.heads import HeadData

    rng = np.random.default_rng(0)
    y, val_y = rng.integers(0, 3, 300), rng.integers(0, 3, 60)
    x, val_x = (rng.normal(size=(n, 8)) + 3 * np.eye(3, 8)[labels] for n, labels in ((300, y), (60, val_y)))
    cfg = cfg_factory("features.head_epochs=100", "features.head_patience=2", "trainer.early_stop_patience=0",
                      "trainer.epochs=1", "optim.lr=0.05", "features.head=linear")
    fit = HeadFit(cfg.features.head, head_training(cfg.features, cfg.trainer, cfg.optim, seed=cfg.seed,
                                                   sampler=cfg.dataset.sampler), cfg.loss)
    head = train_head(HeadData(x, y, val_x, val_y, 3), fit, standardize=False)
    assert len(head["history"]) == head["best_epoch"] + 2 < 100
