"""The auto strategy: the four cases, measured on real features, and the decision record."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import HYMENOPTERA, compose_cfg
from pipeline.data.augment import build_eval_transform
from pipeline.data.folder import SplitLayout, load_imagefolder
from pipeline.model.backbone import build_backbone, data_config
from pipeline.model.freezing import layer_groups
from pipeline.train import train
from pipeline.transfer.auto import choose_mode, decide_strategy, size_class


def test_the_four_cases():
    kw = dict(similar_freeze_depth=2, shallow_unfreeze=3)
    assert choose_mode("small", True, 8, **kw)[:2] == ("linear_probe", 8)
    assert choose_mode("large", True, 8, **kw)[:2] == ("partial", 2)
    assert choose_mode("small", False, 8, **kw)[:2] == ("partial", 5)
    assert choose_mode("large", False, 8, **kw)[:2] == ("finetune", 0)
    assert size_class({"a": 300, "b": 1200}, 300, 1500)["size"] == "large"
    assert size_class({"a": 299, "b": 5000}, 300, 1500)["size"] == "small"


@pytest.fixture(scope="module")
def lite0():
    model, _ = build_backbone(name="tf_efficientnet_lite0", num_classes=2, weights="embedded",
                              cache_dir=str(Path("data/weights").resolve()))
    return model.eval()


def _auto_cfg(**kw):
    return OmegaConf.merge(compose_cfg().strategy.auto, kw)  # the shipped thresholds (conf/strategy/_base.yaml)


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="needs ../shared/datasets/hymenoptera (real photos)")
def test_small_natural_photos_get_linear_probe(lite0, tmp_path):
    root = tmp_path / "hym"
    for c in ("ants", "bees"):
        (root / "train" / c).mkdir(parents=True)
        for f in sorted((HYMENOPTERA / "train" / c).glob("*.jpg"))[:25]:
            (root / "train" / c / f.name).write_bytes(f.read_bytes())
    split = load_imagefolder(root, SplitLayout(val_fraction=0.2)).train
    decision = decide_strategy(lite0, split, build_eval_transform(data_config(lite0)), torch.device("cpu"),
                               n_groups=len(layer_groups(lite0)), auto_cfg=_auto_cfg(sample_per_class=20))
    assert decision["size"] == "small" and decision["similarity"]["similar"]
    assert decision["mode"] == "linear_probe"


def test_large_synthetic_textures_get_finetuning(lite0, tmp_path):
    """Noise textures told apart by brightness: raw pixels do it as well as ImageNet features (gain ~0)."""
    rng = np.random.default_rng(0)
    for c, mean in (("dark", 90), ("light", 150)):
        (tmp_path / "tex" / "train" / c).mkdir(parents=True)
        for i in range(760):
            arr = np.clip(rng.normal(mean, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "tex" / "train" / c / f"{i}.png")
    split = load_imagefolder(tmp_path / "tex", SplitLayout(val_fraction=0.01)).train
    decision = decide_strategy(lite0, split, build_eval_transform(data_config(lite0, 96)), torch.device("cpu"),
                               n_groups=len(layer_groups(lite0)), auto_cfg=_auto_cfg(sample_per_class=30))
    assert decision["size"] == "large" and not decision["similarity"]["similar"]
    assert decision["mode"] == "finetune" and decision["freeze_depth"] == 0


def test_auto_run_writes_decision_record(tiny_folder, cfg_factory):
    cfg = cfg_factory("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "strategy=auto")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    decision = json.loads((run / "decision.json").read_text())
    assert decision["mode"] == metrics["mode"] and decision["total"] == 36
    for key in ("feature_separability", "feature_logme", "pixel_separability", "gain", "similar_gain_threshold"):
        assert key in decision["similarity"]
    summary = (run / "summary.md").read_text()
    assert "## Strategy decision (auto)" in summary and f"{decision['similarity']['gain']:.3f}" in summary
    assert decision["rule"] in summary
