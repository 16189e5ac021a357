"""LogME (You et al., ICML 2021): how well frozen features suit a labelled task, without training.

For each class c, a Bayesian linear model y_c = F w + noise with prior w ~ N(0, 1/alpha) and noise
precision beta; alpha and beta are set by maximising the evidence p(y_c | F) with MacKay's fixed-point
updates, computed in the SVD basis of F so every class costs O(N k). The score is the per-sample log
evidence averaged over classes: higher = the features carry the labels more linearly. Scores compare
feature sets on the *same* labels (backbones, depths), not across datasets.
"""
from __future__ import annotations

import numpy as np


def _class_evidence(y: np.ndarray, x2: np.ndarray, sigma: np.ndarray, n: int, d: int,
                    max_iter: int = 100, tol: float = 1e-4) -> float:
    """Maximised log evidence / n for one target vector (projections x2 = (U^T y)^2, sigma = s^2)."""
    res_outside = max(float(y @ y - x2.sum()), 0.0)  # part of y outside the span of F
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
        res2 = float((x2 / (1.0 + sigma / t) ** 2).sum()) + res_outside
        alpha = gamma / (m2 + 1e-5)
        beta = (n - gamma) / (res2 + 1e-5)
        if abs(alpha / beta - t) / t < tol:
            break
    t = alpha / beta
    m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
    res2 = float((x2 / (1.0 + sigma / t) ** 2).sum()) + res_outside
    # log|A| for A = alpha I + beta F^T F: the d - k zero eigenvalues of F^T F contribute log(alpha) each
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * np.log(alpha)
    evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * log_det - beta / 2.0 * res2
                - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi))
    return evidence / n


def logme_score(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of `features` (N x D) for integer `labels` (N,): mean over classes of the per-sample evidence."""
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(labels) or len(f) < 2:
        raise ValueError(f"logme_score needs N x D features and N labels, got {f.shape} and {labels.shape}")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s ** 2
    keep = sigma > sigma.max() * 1e-12 if sigma.size and sigma.max() > 0 else np.zeros_like(sigma, bool)
    u, sigma = u[:, keep], sigma[keep]
    scores = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        x2 = (u.T @ y) ** 2
        scores.append(_class_evidence(y, x2, sigma, n, d))
    return float(np.mean(scores))
