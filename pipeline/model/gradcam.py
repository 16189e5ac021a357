"""Grad-CAM (Selvaraju et al., 2017): where in the image a CNN finds the evidence for a class.

The target layer is the backbone's last feature map, timm's `forward_features(x)` (N, C, h, w): for any timm CNN
the output of its last conv stage, the map its classifier pools (`feature_map` returns it with the rest of the
network as a function of it, so the choice can be checked). Grad-CAM weighs each channel by the spatial mean of
the class score's gradient, keeps relu(sum_c w_c A_c), upsamples it bilinearly to the input and scales each map
to a peak of 1. A multi-depth probe (model/multidepth.py) is explained on the deepest level it pools; the TTA and
temperature wrapper (model/calibrated.py) is looked through, so the map explains the identity view; an ensemble
(model/ensemble.py) is explained by the mean of its members' maps, each of the member's own class score. Hand-written
rather than the `grad-cam` package, because importing that package loads scikit-learn, scipy and
matplotlib.pyplot, which `pipeline.load` and predict keep out, and it needs a hooked module as its target where
timm already splits `forward_features` from `forward_head`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.model.calibrated import CalibratedClassifier
from pipeline.model.ensemble import member_models
from pipeline.model.multidepth import HEAD, MultiDepthClassifier

Head = Callable[[torch.Tensor], torch.Tensor]  # the target feature map -> logits


class NoFeatureMapError(PipelineError):
    """The backbone has no spatial feature map before its head (a ViT): Grad-CAM needs a CNN."""


def explained(model: torch.nn.Module) -> torch.nn.Module:
    """The classifier a CAM explains: `model` without its TTA/temperature wrapper."""
    return model.model if isinstance(model, CalibratedClassifier) else model


def _checked(fmap: torch.Tensor, channels: int, net: torch.nn.Module) -> torch.Tensor:
    if fmap.ndim != 4 or fmap.shape[1] != channels:
        arch = (getattr(net, "pretrained_cfg", None) or {}).get("architecture", type(net).__name__)
        raise NoFeatureMapError(f"Grad-CAM needs a CNN backbone (a C x H x W feature map before the head); {arch} "
                                f"gives features of shape {tuple(fmap.shape[1:])}: use a CNN such as "
                                "tf_efficientnet_lite0, or leave cam off")
    return fmap


def feature_map(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, Head]:
    """(the target feature map (N, C, h, w), the network from it to the logits) for a batch of `images`."""
    net = explained(model)
    if not isinstance(net, MultiDepthClassifier):
        if not hasattr(net, "forward_features"):
            raise NoFeatureMapError(f"Grad-CAM needs a timm CNN backbone; {type(net).__name__} has no forward_features")
        return _checked(net.forward_features(images), net.num_features, net), net.forward_head
    body, ints = net.backbone, [v for v in net.levels if v != HEAD]  # a MultiDepthClassifier has >= 1 int level
    final, inner = body.forward_intermediates(images, indices=ints, stop_early=HEAD not in net.levels)
    pooled = [t.mean(dim=(2, 3)) for t in inner]
    if HEAD in net.levels:
        return (_checked(final, body.num_features, body),
                lambda fmap: net.fc(torch.cat([*pooled, body.forward_head(fmap, pre_logits=True)], dim=1)))
    deepest = _checked(inner[-1], body.feature_info[ints[-1]]["num_chs"], body)
    return deepest, lambda fmap: net.fc(torch.cat([*pooled[:-1], fmap.mean(dim=(2, 3))], dim=1))


def grad_cam(model: torch.nn.Module, images: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Grad-CAM of class `classes[i]` for image i: (N, H, W) on CPU in [0, 1], at the input's resolution."""
    members = member_models(explained(model))
    if len(members) > 1:
        return _peak_one(torch.stack([grad_cam(member, images, classes) for member in members]).mean(dim=0))
    device = next(explained(model).parameters()).device
    with torch.inference_mode(False):  # callers may be in inference mode; autograd needs normal tensors
        with torch.no_grad():  # the backbone runs once, without a graph
            fmap, head = feature_map(model, images.to(device).clone())
        fmap = fmap.detach().float().requires_grad_()
        with torch.enable_grad():  # only the head, from the feature map on
            score = head(fmap).float().gather(1, torch.tensor(list(classes), device=device)[:, None]).sum()
            (grad,) = torch.autograd.grad(score, fmap)
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * fmap.detach()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        return _peak_one(cam).cpu()


def _peak_one(cam: torch.Tensor) -> torch.Tensor:
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def model_view(images: torch.Tensor, preprocessing: dict) -> np.ndarray:
    """The normalized input batch back as the uint8 images (N, H, W, 3) the model saw (after resize and crop)."""
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on the jet colour map (blue = 0, red = 1)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)[..., None]
    return (np.clip(1.5 - np.abs(4 * v - np.array([3, 2, 1], np.float32)), 0, 1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heat map `cam` (H, W in [0, 1]) blended onto `image` (H, W, 3 uint8) with weight `alpha`."""
    blend = (1 - alpha) * image.astype(np.float32) + alpha * jet(cam).astype(np.float32)
    return blend.round().clip(0, 255).astype(np.uint8)


def cam_overlays(model: torch.nn.Module, images: torch.Tensor, classes: Sequence[int],
                 preprocessing: dict) -> list[np.ndarray]:
    """One overlay per image: the Grad-CAM of its class on the model's view of it (H, W, 3 uint8)."""
    cams = grad_cam(model, images, classes).numpy()
    return [overlay(view, cam) for view, cam in zip(model_view(images, preprocessing), cams)]
