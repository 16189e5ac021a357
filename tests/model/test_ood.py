"""OOD scores (model/ood.py): the features are the classifier layer's inputs of one pass (first TTA view, an
ensemble's members side by side), the kNN module computes what it names, and the threshold keeps
the share of val it is asked to."""
from __future__ import annotations

import numpy as np
import timm
import torch

from pipeline.model import ensemble, ood
from pipeline.model.calibrated import CalibratedClassifier


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()


@torch.inference_mode()
def test_features_are_the_classifier_input_of_the_same_pass():
    net, x = _net(), torch.randn(4, 3, 64, 64)
    logits, feats = ood.logits_and_features(net, x)
    assert torch.allclose(logits, net(x))
    assert torch.allclose(feats, net.forward_head(net.forward_features(x), pre_logits=True))
    tta = CalibratedClassifier(net, ("identity", "hflip"), 2.0)
    logits, tta_feats = ood.logits_and_features(tta, x)
    assert torch.allclose(logits, tta(x)) and torch.allclose(tta_feats, feats)  # the first view's, once
    members = [net, _net(1)]
    both = ensemble.EnsembleClassifier(members, (1.0, 1.5))
    _, ens_feats = ood.logits_and_features(both, x)
    second = members[1].forward_head(members[1].forward_features(x), pre_logits=True)
    assert torch.allclose(ens_feats, torch.cat([feats, second], dim=1))
    assert not net._forward_pre_hooks and not net.get_classifier()._forward_pre_hooks  # hooks removed


def test_knn_is_the_similarity_to_the_kth_nearest_train_feature():
    rng = np.random.default_rng(2)
    train, query = rng.normal(size=(50, 8)), rng.normal(size=(4, 8))
    score = ood.fit_knn(train, k=3)
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    sims = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ unit.T
    assert np.allclose(score(torch.from_numpy(query)).numpy(), np.sort(sims, axis=1)[:, -3], atol=1e-5)
    assert score(torch.from_numpy(train[:1] * 7)).item() >= score(torch.from_numpy(-train[:1])).item()
    assert ood.fit_knn(train[:2]).k == 2  # k capped at the bank's size


def test_the_threshold_keeps_the_asked_share_of_val():
    val = np.random.default_rng(1).normal(size=1000)
    t = ood.keep_threshold(val, 0.95)
    assert abs(np.mean(val >= t) - 0.95) < 0.002
