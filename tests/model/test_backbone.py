"""Backbone weight routes and their error messages."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.errors import PipelineError
from pipeline.model.backbone import build_backbone, check_arch, data_config, read_state_dict


def test_local_safetensors_and_pth_weights_load_except_head(tmp_path):
    source = timm.create_model("test_resnet", num_classes=7)
    sd = source.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model, desc = build_backbone(name="test_resnet", num_classes=2, weights=str(tmp_path / name))
        assert desc == f"file:{tmp_path / name}"
        torch.testing.assert_close(model.conv1[0].weight, source.conv1[0].weight)
        assert model.fc.out_features == 2


def test_weights_for_another_arch_fail_clearly(tmp_path):
    save_file(timm.create_model("test_efficientnet").state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="do not match test_resnet"):
        build_backbone(name="test_resnet", num_classes=2, weights=str(tmp_path / "other.safetensors"))


def test_missing_and_garbage_weight_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone.weights file not found"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read weights file"):
        read_state_dict(tmp_path / "junk.pth")


def test_unknown_arch_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean: .*tf_efficientnet_lite0"):
        check_arch("tf_efficientnet_lite")


def test_hub_failure_offline_names_the_fix(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match="backbone.weights=/path/to/weights.safetensors"):
        build_backbone(name="resnet18", num_classes=2, weights="hub")


def test_preprocessing_comes_from_pretrained_cfg():
    model = timm.create_model("tf_efficientnet_lite2")
    cfg = data_config(model)
    assert cfg["input_size"] == [3, 260, 260] and cfg["mean"] == [0.5] * 3 and cfg["interpolation"] == "bicubic"
    assert data_config(model, input_size=128)["input_size"] == [3, 128, 128]
