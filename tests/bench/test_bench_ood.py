"""bench/bench_ood.py's alternative scores: the Mahalanobis module computes the distance it names."""
from __future__ import annotations

import sys

import numpy as np
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from bench_ood import fit_mahalanobis  # noqa: E402


def test_mahalanobis_is_the_smallest_distance_under_the_shared_precision():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([1, 2, 3, 1, 1, 0.5])
    y = rng.integers(0, 3, 200)
    x[y == 2] += 4
    score = fit_mahalanobis(x, y, 3)
    means = np.stack([x[y == k].mean(0) for k in range(3)])
    from sklearn.covariance import LedoitWolf
    precision = LedoitWolf(assume_centered=True).fit(x - means[y]).precision_
    q = rng.normal(size=(5, 6))
    expected = -np.min([np.einsum("nd,de,ne->n", q - m, precision, q - m) for m in means], axis=0)
    assert np.allclose(score(torch.from_numpy(q).float()).numpy(), expected, rtol=1e-3, atol=1e-3)
    far = score(torch.full((1, 6), 30.0))
    assert far.item() < score(torch.from_numpy(means[:1]).float()).item()
