"""TTA + temperature wrapper (model/calibrated.py): the eager module, TorchScript and ONNX compute the same thing."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch

from pipeline.errors import ModelFileError
from pipeline.model.calibrated import CalibratedClassifier, wrap_for_inference


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=3).eval()


def expected(net: torch.nn.Module, x: torch.Tensor, flip: bool, temperature: float) -> torch.Tensor:
    """By hand: the mean of the logits of the image and (if flip) of its mirror image along the width, over T."""
    with torch.no_grad():
        views = [net(x)] + ([net(x[..., torch.arange(x.shape[-1] - 1, -1, -1)])] if flip else [])
    return sum(views) / len(views) / temperature


@pytest.mark.parametrize("views, flip, temperature", [
    (("identity", "hflip"), True, 2.5), (("identity",), False, 0.4), (("identity", "hflip"), True, 1.0)])
def test_forward_is_the_mean_over_views_divided_by_t(net, views, flip, temperature):
    x = torch.randn(3, 3, 32, 48)  # not square: the flip must mirror the width, not the height
    with torch.no_grad():
        got = CalibratedClassifier(net, views, temperature).eval()(x)
    torch.testing.assert_close(got, expected(net, x, flip, temperature), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, expected(net, x, not flip, temperature), atol=1e-4)


def test_wrap_for_inference_only_when_meta_asks(net):
    assert wrap_for_inference(net, {}) is net
    assert wrap_for_inference(net, {"tta": ["identity"], "temperature": 1.0}) is net
    wrapped = wrap_for_inference(net, {"tta": ["identity", "hflip"]})
    assert isinstance(wrapped, CalibratedClassifier) and wrapped.views == ["identity", "hflip"]
    assert wrapped.temperature == 1.0 and not wrapped.training
    scaled = wrap_for_inference(net, {"temperature": 3})
    assert scaled.views == ["identity"] and scaled.temperature == 3.0
    assert set(scaled.state_dict()) == {f"model.{k}" for k in net.state_dict()}  # no extra tensors


@pytest.mark.parametrize("meta, message", [
    ({"tta": ["identity", "vflip"]}, "tta="), ({"tta": "hflip"}, "tta="),
    ({"temperature": 0}, "temperature=0"), ({"temperature": "2"}, "temperature="),
    ({"temperature": float("nan")}, "temperature=nan")])
def test_malformed_meta_fails_in_one_line(net, meta, message):
    with pytest.raises(ModelFileError, match=message) as info:
        wrap_for_inference(net, meta, "model.json")
    assert "\n" not in str(info.value) and str(info.value).startswith("model.json")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_torchscript_and_onnx_compute_the_same_as_eager(net, tmp_path):
    import onnxruntime as ort

    wrapped = CalibratedClassifier(net, ("identity", "hflip"), 0.7).eval()
    x = torch.randn(4, 3, 40, 40)
    ref = expected(net, x, True, 0.7)
    scripted = torch.jit.script(wrapped)
    torch.jit.save(scripted, str(tmp_path / "m.ts"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (x[:2],), str(tmp_path / "m.onnx"), dynamo=False, input_names=["input"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        loaded = torch.jit.load(str(tmp_path / "m.ts"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (x, x[:1]):  # the exported batch size was 2: the batch axis is dynamic
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch), ref[:len(batch)], rtol=0, atol=1e-5)
        onnx_out = session.run(None, {"input": batch.numpy()})[0]
        np.testing.assert_allclose(onnx_out, ref[:len(batch)].numpy(), rtol=0, atol=1e-5)
