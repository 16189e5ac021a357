"""Out-of-distribution scores: how much an image looks like the training data, from the classifier's own inputs.

Every classifier here ends in one linear layer (timm's `get_classifier()`, MultiDepthClassifier's `fc`, each
member's for an ensemble). Its input, the penultimate features, is what a score reads: `logits_and_features`
hooks those layers for one forward pass, so the score costs no second backbone pass. The first call of each layer
is kept, which under TTA is the first view's.

Scores, higher = more like the training data, measured against each other by bench/bench_ood.py (docs/export.md),
which holds the others:
- `knn` (what runs ship, `KnnScore`): the cosine similarity to the k-th nearest of a sample of train features.
  Far sets: AUROC 0.999-1.000 on all 4 models; near (a held-out class): 0.76-0.85.
- `mahalanobis`: minus the smallest squared Mahalanobis distance to a class mean, one shared covariance
  (Ledoit-Wolf). Far 0.93-1.00, near 0.67-0.73.
- `energy` (logsumexp of the logits) and `msp` (top softmax probability): best on digits' held-out class (0.94),
  blind to far sets (AUROC 0.22-0.99: an X-ray model calls photos confidently).
`KnnScore` is a torch module (one buffer) that traces to TorchScript and exports to ONNX.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.errors import ModelFileError
from pipeline.model.calibrated import CalibratedClassifier
from pipeline.model.ensemble import member_models

KEY = "ood"  # the checkpoint JSON's key: {"score", "k", "threshold", "keep", "train_images", ...} or {"skipped": why}
PREFIX = "ood."  # the score's tensors in the checkpoint's safetensors file, beside the model's
K = 10  # the neighbour whose similarity is the score (bench/bench_ood.py: k=10 on 1200 train images)


def prefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in tensors.items()}


def split_weights(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the model's tensors, the OOD score's tensors, prefix removed) of a checkpoint's weights."""
    model = {k: v for k, v in weights.items() if not k.startswith(PREFIX)}
    return model, {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}


def classifier_layers(model: nn.Module) -> list[nn.Linear]:
    """The final linear layer of each classifier in `model` (unwrapping TTA/temperature and ensembles)."""
    inner = model.model if isinstance(model, CalibratedClassifier) else model
    layers = []
    for member in member_models(inner):
        head = member.fc if hasattr(member, "levels") else member.get_classifier()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{type(member).__name__} does not end in one linear layer ({type(head).__name__})")
        layers.append(head)
    return layers


def logits_and_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model(images) and its penultimate features (N, D; an ensemble's members concatenated), in one pass: the
    classifier layers' inputs are read by hooks, each layer's first call (under TTA, the first view's)."""
    layers, seen = classifier_layers(model), {}

    def hook(layer, args):
        seen.setdefault(id(layer), args[0])

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, torch.cat([seen[id(layer)].float() for layer in layers], dim=1)


class ScoredClassifier(nn.Module):
    """(logits, OOD score) of a classifier in one pass: what the ONNX and TorchScript exports compute."""

    def __init__(self, model: nn.Module, score: nn.Module):
        super().__init__()
        self.model, self.score = model, score

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = logits_and_features(self.model, images)
        return logits, self.score(features)


class KnnScore(nn.Module):
    """features (N, D) -> cosine similarity to the k-th nearest row of `bank` (unit-length train features)."""

    def __init__(self, bank: torch.Tensor, k: int):
        super().__init__()
        self.register_buffer("bank", bank.float())
        self.k = int(k)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = nn.functional.normalize(features.float(), dim=1)
        return (f @ self.bank.T).topk(self.k, dim=1).values[:, -1]


def fit_knn(features: np.ndarray, k: int = K) -> KnnScore:
    """The train features, made unit length, as the bank (k: at most the bank's size)."""
    bank = nn.functional.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=1)
    return KnnScore(bank, min(k, len(bank)))


def score_module(record: dict | None, tensors: dict[str, torch.Tensor], source: str) -> KnnScore | None:
    """The fitted score a checkpoint's `ood` record and its `ood.` tensors describe; None where it has none."""
    if not record or "skipped" in record:
        return None
    if set(tensors) != {"bank"}:
        raise ModelFileError(f"{source}: the ood record needs the tensor {PREFIX}bank, the weights hold "
                             f"{sorted(PREFIX + k for k in tensors)}; re-export the model")
    bank = tensors["bank"]
    if bank.ndim != 2 or bank.shape[1] != record.get("features") or not 1 <= record.get("k", 0) <= bank.shape[0]:
        raise ModelFileError(f"{source}: the ood tensors' shape {list(bank.shape)} does not fit "
                             f"{record.get('features')} features and k={record.get('k')}; re-export the model")
    return KnnScore(bank, record["k"]).eval()


def keep_threshold(val_scores: np.ndarray, keep: float) -> float:
    """The score above which `keep` of the val images lie (they are in distribution by construction)."""
    return float(np.quantile(np.asarray(val_scores, dtype=np.float64), 1 - keep))
