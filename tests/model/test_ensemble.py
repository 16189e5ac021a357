"""The ensemble module (model/ensemble.py): the mean of the members' calibrated probabilities, rebuilt from a
checkpoint's JSON, the same in TorchScript and ONNX, validated, and explained by Grad-CAM through its members."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from pipeline.errors import ModelFileError
from pipeline.model import ensemble, gradcam, meta_check
from pipeline.model.checkpoint import build_model
from pipeline.ship.saving import export_onnx, export_torchscript
from pipeline.training import paired

TEMPERATURES = (0.7, 1.6)


def _member(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()


@pytest.fixture(scope="module")
def members() -> list[torch.nn.Module]:
    return [_member(0), _member(1)]


def _meta(temperatures=TEMPERATURES) -> dict:
    return {"arch": "test_efficientnet", "num_classes": 3, "class_names": ["a", "b", "c"],
            ensemble.KEY: ensemble.spec(temperatures, ("probe", "fine-tune"))}


def _built(members) -> torch.nn.Module:
    return build_model(_meta(), ensemble.combined_weights([m.state_dict() for m in members]), "test")


def test_forward_is_the_log_mean_of_tempered_probabilities(members):
    x = torch.randn(5, 3, 64, 64)
    model = _built(members)
    with torch.no_grad():
        got = model(x)
        expected = torch.stack([torch.softmax(m(x) / t, 1) for m, t in zip(members, TEMPERATURES)]).mean(0)
        member_logits = [m(x).numpy() for m in members]
    assert torch.allclose(torch.softmax(got, 1), expected, atol=1e-6)
    # the same numbers the selection scored on val (training/paired.py), at the same temperatures
    labels = np.array([0, 1, 2, 0, 1])
    mixed, temperatures = paired.mean_probabilities(labels, *member_logits)
    refit = build_model(_meta(temperatures), ensemble.combined_weights([m.state_dict() for m in members]), "test")
    with torch.no_grad():
        assert np.allclose(refit(x).numpy(), mixed, atol=1e-5)


def test_torchscript_and_onnx_compute_the_same_as_eager(members, tmp_path):
    import onnxruntime as ort

    model, x = _built(members), torch.randn(4, 3, 64, 64)
    assert "skipped" not in export_onnx(model, x[:2], tmp_path / "m.onnx", 17)
    assert export_torchscript(model, x[:2], tmp_path / "m.ts")["method"] == "script"
    with torch.no_grad():
        eager = model(x).numpy()
        scripted = torch.jit.load(str(tmp_path / "m.ts"))(x).numpy()
    onnx_out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    assert np.allclose(scripted, eager, atol=1e-5) and np.allclose(onnx_out, eager, atol=1e-4)


def test_weights_of_the_wrong_members_fail_in_one_line(members):
    weights = ensemble.combined_weights([members[0].state_dict()])  # one member's weights for two
    with pytest.raises(ModelFileError, match="missing keys"):
        build_model(_meta(), weights, "test")


@pytest.mark.parametrize("value, field", [
    ({"members": [{"temperature": 1.0}]}, "ensemble.members"),  # one member is not an ensemble
    ({"members": [{"temperature": 1.0}, {"temperature": -1}]}, r"ensemble.members\[1\].temperature"),
    ({"members": [{"temperature": 1.0}, {"temperature": 1.0, "feature_levels": "x"}]}, "feature_levels"),
    ([1, 2], "ensemble.members"),
])
def test_a_malformed_ensemble_entry_is_refused_before_anything_is_built(value, field):
    with pytest.raises(ModelFileError, match=field):
        meta_check.check_model_fields({**_meta(), ensemble.KEY: value}, "model.json")


def test_grad_cam_of_an_ensemble_is_the_mean_of_its_members_maps(members):
    x, classes = torch.randn(3, 3, 64, 64), [0, 1, 2]
    each = [gradcam.grad_cam(m, x, classes) for m in members]
    mean = torch.stack(each).mean(0)
    expected = mean / mean.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    assert torch.allclose(gradcam.grad_cam(_built(members), x, classes), expected, atol=1e-5)
