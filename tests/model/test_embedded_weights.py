"""The embedded ImageNet weights: exact conversion and a real prediction."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from pipeline.data.augment import build_eval_transform
from pipeline.model.backbone import build_backbone, data_config
from pipeline.model.embedded_weights import embedded_state_dict, package_weights_path

IMAGENET_DAISY = 985


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    cache = tmp_path_factory.mktemp("weights")
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(embedded_state_dict("tf_efficientnet_lite0", cache), strict=True)
    return model.eval(), cache


def test_converted_lite0_matches_original_package(lite0):
    from efficientnet_lite_pytorch import EfficientNet

    model, _ = lite0
    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=str(package_weights_path("tf_efficientnet_lite0"))).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - reference(x)).abs().max().item()
    assert diff < 1e-4


def test_conversion_is_cached_as_safetensors(lite0):
    _, cache = lite0
    cached = cache / "tf_efficientnet_lite0.in1k.safetensors"
    assert cached.is_file()
    again = embedded_state_dict("tf_efficientnet_lite0", cache)  # second call reads the cache
    assert set(again) == set(timm.create_model("tf_efficientnet_lite0").state_dict())


def test_lite0_top1_on_sklearn_flower_is_daisy(lite0):
    from sklearn.datasets import load_sample_image

    model, _ = lite0
    image = load_sample_image("flower.jpg")
    x = build_eval_transform(data_config(model))(image=image)["image"].unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == IMAGENET_DAISY


def test_build_backbone_replaces_head_and_keeps_features(lite0, tmp_path):
    reference, cache = lite0
    model, desc = build_backbone(name="tf_efficientnet_lite0", num_classes=3, weights="embedded", cache_dir=str(cache))
    assert desc.startswith("embedded")
    assert model.get_classifier().out_features == 3
    assert torch.count_nonzero(model.get_classifier().weight) == 0  # zero-initialised new head
    torch.testing.assert_close(model.conv_stem.weight, reference.conv_stem.weight)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        np.testing.assert_allclose(model.eval().forward_features(x), reference.forward_features(x), atol=1e-5)


def test_first_conversion_leaves_the_seeded_random_stream_alone(tmp_path):
    """The same seed gives the same run whether or not the weights were converted before: converting (which builds
    a reference model) must not draw from the global RNG that dropout uses later."""
    def draws_after(cache_dir) -> torch.Tensor:
        torch.manual_seed(0)
        embedded_state_dict("tf_efficientnet_lite0", cache_dir)
        return torch.rand(4)

    first = draws_after(tmp_path / "fresh")  # converts and writes the cache
    assert (tmp_path / "fresh" / "tf_efficientnet_lite0.in1k.safetensors").is_file()
    again = draws_after(tmp_path / "fresh")  # reads the cache
    assert torch.equal(first, again)
