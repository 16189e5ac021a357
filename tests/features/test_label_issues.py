"""Label-error candidates: injected label flips come out on top of cleanlab's ranking."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from conftest import make_imagefolder
from pipeline.data.folder import load_imagefolder
from pipeline.features.cached_fit import FeatureSource, extraction
from pipeline.features.label_issues import audit_model, find_candidates, label_issues_markdown, rank_label_issues

FLIPS = 10


def flipped_folder(root: Path) -> tuple[Path, set[str]]:
    """3 colour classes x 30 train images (classes a random-init backbone separates), 10 moved to a wrong class."""
    make_imagefolder(root, {"blue": 30, "green": 30, "red": 30}, "train")
    make_imagefolder(root, {"blue": 4, "green": 4, "red": 4}, "val", offset=500)
    classes = ["blue", "green", "red"]
    flipped = set()
    for k in range(FLIPS):
        given, true = classes[(k + 1) % 3], classes[k % 3]
        src = root / "train" / true / f"{true}_{k}.png"
        dst = root / "train" / given / f"was_{true}_{k}.png"
        shutil.move(src, dst)
        flipped.add(str(dst))
    return root, flipped


def test_injected_label_flips_are_in_the_top_candidates(tmp_path, cfg_factory):
    root, flipped = flipped_folder(tmp_path / "ds")
    cfg = cfg_factory("dataset=folder", f"dataset.root={root}", "backbone=tiny", "backbone.input_size=32")
    data = load_imagefolder(root)
    build = dict(input_size=cfg.dataset.input_size, grayscale_input=cfg.augment.grayscale_input, seed=cfg.seed)
    model, eval_tf, desc = audit_model(cfg.backbone, len(data.classes), **build)
    source = FeatureSource(extraction(cfg.features, cfg.trainer, torch.device("cpu")), cfg.backbone.name, eval_tf)
    report = find_candidates(model, data, source, audit=cfg.audit, seed=cfg.seed, weights_desc=desc)
    top = report["candidates"]
    assert len(top) <= cfg.audit.label_issues_top == 20 and report["images"] == 102
    assert len({c["path"] for c in top} & flipped) >= 7
    first = next(c for c in top if c["path"] in flipped)
    assert first["suggested"] == Path(first["path"]).name.split("_")[1] != first["given"]
    assert [c["p_given"] for c in top] == sorted(c["p_given"] for c in top)  # ranked by self-confidence
    text = "\n".join(label_issues_markdown(report))
    assert "### Label-error candidates" in text and f"`{Path(first['path']).name}`" in text
    rebuilt, _, _ = audit_model(cfg.backbone, len(data.classes), **build)
    again = find_candidates(rebuilt, data, source, audit=cfg.audit, seed=cfg.seed)
    assert again["feature_cache"] == "hit" and again["candidates"] == top  # seeded model, cached features


def test_rank_label_issues_skips_a_class_with_one_image():
    x, y = np.random.default_rng(0).normal(size=(5, 3)), np.array([0, 0, 0, 0, 1])
    assert "fewer than 2" in rank_label_issues(x, y, 2, folds=5, seed=0)["skipped"]
