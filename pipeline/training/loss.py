"""Loss stage: cross-entropy / focal loss, class weights, and the head's prior-bias init.

Class weights (`loss.class_weights`):
  none       every class weighs 1
  balanced   sklearn's inverse frequency, n_samples / (n_classes * count_c)
  effective  Cui et al. 2019, (1 - beta) / (1 - beta^count_c), scaled to sum to n_classes
  {name: w}  explicit mapping; classes left out weigh 1

The prior bias sets the classifier bias to log(p_c), p_c being the class distribution the
loss actually sees: train counts times class weights, or uniform under the balanced sampler.
With the zero-initialised head weights the untrained model then predicts exactly p_c and the
initial loss equals the entropy of p_c instead of log K.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from pipeline.config.schema import LossConfig
from pipeline.data.folder import DatasetSplits
from pipeline.errors import ConfigError
from pipeline.runtime import distributed
from pipeline.runtime.files import write_json

_logger = logging.getLogger(__name__)

AUTO_PRIOR_RATIO = 3.0  # prior_bias=auto turns on above this max/min class-count ratio


class FocalLoss(torch.nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p)^gamma, optional class weights.

    Per sample: -sum_c w_c q_c (1 - p_c)^gamma log p_c, q the label-smoothed target distribution, divided by the
    batch's sum of w[target]: the same weighting convention as torch's CrossEntropyLoss, so gamma=0 gives exactly
    `ce` with the same weights and smoothing. `target` is class indices (N,) or soft targets (N, K) rows of class
    probabilities (mixup/cutmix, training/mixing.py): q smooths them the same way and the divisor becomes the batch's
    sum_c w_c t_c, so one-hot rows give exactly the loss of their indices. With gamma=0 this is the soft-target
    cross-entropy that `ce` uses under mixing (`build_loss(soft_targets=True)`).
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        k = logits.shape[1]
        t = target.float() if target.is_floating_point() else F.one_hot(target, k).float()
        q = t * (1 - self.label_smoothing) + self.label_smoothing / k
        w = self.weight if self.weight is not None else torch.ones(k, device=logits.device)
        focus = (1 - log_p.exp()).pow(self.gamma) if self.gamma else 1.0
        per_sample = -(w * q * focus * log_p).sum(1)
        return per_sample.sum() / (t * w).sum().clamp_min(1e-12)


def build_loss(*, name: str = "ce", label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
               gamma: float = 2.0, soft_targets: bool = False) -> torch.nn.Module:
    """`ce` (torch CrossEntropyLoss) or `focal`, both with optional per-class weights. `soft_targets`: the loss
    also takes (N, K) target rows (mixup/cutmix); `ce` is then FocalLoss with gamma=0 (torch's CE would divide a
    weighted soft-target loss by N, not by the weights)."""
    if name == "focal" or soft_targets:
        return FocalLoss(gamma=gamma if name == "focal" else 0.0, weight=class_weights, label_smoothing=label_smoothing)
    return torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


def build_losses(loss_cfg, class_weights: torch.Tensor | None, device: torch.device | None = None, *,
                 soft_targets: bool = False) -> tuple:
    """(training loss with label smoothing, on `device`; eval loss without it, on CPU logits), both with the
    class weights: the pair every fit uses (`loss` config group). `soft_targets`: the training loss takes the
    mixed targets of training/mixing.py (and smooths them: mixing itself does not); the eval loss stays hard-label."""
    train_weights = None if class_weights is None else class_weights.to(device or "cpu")
    train_loss = build_loss(name=loss_cfg.name, label_smoothing=loss_cfg.label_smoothing, gamma=loss_cfg.gamma,
                            class_weights=train_weights, soft_targets=soft_targets)
    return train_loss, build_loss(name=loss_cfg.name, gamma=loss_cfg.gamma, class_weights=class_weights)


def _mapping_weights(mapping: Mapping, class_names: Sequence[str]) -> np.ndarray:
    unknown = sorted(set(map(str, mapping)) - set(class_names))
    if unknown:
        raise ConfigError(f"loss.class_weights names unknown class(es) {unknown}; classes are: "
                          f"{', '.join(class_names)}")
    try:
        weights = np.array([float(mapping.get(c, 1.0)) for c in class_names])
    except (TypeError, ValueError):
        raise ConfigError(f"loss.class_weights values must be numbers, got {dict(mapping)}") from None
    return weights


def compute_class_weights(counts: Sequence[int], mode="none", *, beta: float = 0.999,
                          class_names: Sequence[str] | None = None) -> np.ndarray:
    """Per-class loss weights for train `counts` (see the module doc for the modes)."""
    counts = np.asarray(counts, dtype=np.int64)
    class_names = list(class_names) if class_names is not None else [str(i) for i in range(len(counts))]
    if isinstance(mode, Mapping):
        weights = _mapping_weights(mode, class_names)
    elif mode is None or mode == "none":
        weights = np.ones(len(counts))
    elif mode == "balanced":
        y = np.repeat(np.arange(len(counts)), counts)
        weights = np.zeros(len(counts))
        present = counts > 0
        weights[present] = compute_class_weight("balanced", classes=np.flatnonzero(present), y=y)
    else:  # effective (the choices are checked at start-up: pipeline/config/checks.py)
        effective_num = 1.0 - np.power(beta, counts.astype(np.float64))
        weights = np.where(counts > 0, (1.0 - beta) / np.maximum(effective_num, 1e-12), 0.0)
        weights = weights * len(counts) / weights.sum()
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not np.any(weights > 0):
        raise ConfigError(f"loss.class_weights gave invalid weights {weights.tolist()}: need finite values >= 0, "
                          "at least one > 0")
    return weights


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Largest over smallest class count (inf when a class is empty)."""
    counts = np.asarray(counts, dtype=np.float64)
    return float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")


def resolve_prior_bias(setting, counts: Sequence[int]) -> bool:
    """`auto` -> on when the imbalance ratio exceeds AUTO_PRIOR_RATIO; `true`/`false` as given."""
    value = str(setting).lower()
    if value == "auto":
        return imbalance_ratio(counts) > AUTO_PRIOR_RATIO
    return value == "true"


def effective_prior(counts: Sequence[int], weights: np.ndarray, sampler: str = "shuffle") -> np.ndarray:
    """Class distribution the loss sees: counts x weights, or weights alone under the balanced sampler."""
    counts = np.asarray(counts, dtype=np.float64)
    mass = weights * (np.where(counts > 0, 1.0, 0.0) if sampler == "balanced" else counts)
    return mass / mass.sum()


def _last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)] if isinstance(head, torch.nn.Module) \
        else []
    if not linears or linears[-1].bias is None:
        raise ConfigError("loss.prior_bias needs a classifier ending in a Linear layer with a bias; "
                          "set loss.prior_bias=false for this backbone")
    return linears[-1]


def init_prior_bias(model: torch.nn.Module, prior: Sequence[float], floor: float = 1e-8) -> list[float]:
    """Set the classifier bias to log(prior) (classes with prior 0 get log(floor)). Returns the bias."""
    linear = _last_linear(model)
    prior = np.asarray(prior, dtype=np.float64)
    if linear.out_features != len(prior):
        raise ConfigError(f"classifier has {linear.out_features} outputs but the prior has {len(prior)} classes")
    bias = np.log(np.maximum(prior, floor))
    with torch.no_grad():
        linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype))
    return bias.tolist()


def label_entropy(prior: Sequence[float]) -> float:
    """Entropy (nats) of a class distribution: the initial cross-entropy under the prior bias."""
    p = np.asarray(prior, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def plan_imbalance(counts: Sequence[int], class_names: Sequence[str], *, class_weights="none", beta: float = 0.999,
                   sampler: str = "shuffle", prior_bias="auto") -> dict:
    """Everything the run decides about imbalance, as a JSON-ready dict (written to class_weights.json)."""
    weights = compute_class_weights(counts, class_weights, beta=beta, class_names=class_names)
    prior = effective_prior(counts, weights, sampler)
    use_prior = resolve_prior_bias(prior_bias, counts)
    mode = dict(class_weights) if isinstance(class_weights, Mapping) else str(class_weights or "none")
    plan = {"class_weights": mode, "beta": beta if mode == "effective" else None,
            "weights": {c: float(w) for c, w in zip(class_names, weights)},
            "train_counts": {c: int(n) for c, n in zip(class_names, counts)},
            "imbalance_ratio": imbalance_ratio(counts), "sampler": sampler,
            "prior_bias": {"setting": str(prior_bias).lower(), "enabled": use_prior,
                           "prior": {c: float(p) for c, p in zip(class_names, prior)},
                           "initial_loss": label_entropy(prior) if use_prior else float(np.log(len(counts)))}}
    _logger.info("Imbalance: ratio %.2f, class weights %s %s, sampler %s, prior bias %s",
                 plan["imbalance_ratio"], mode, {c: round(w, 4) for c, w in plan["weights"].items()}, sampler,
                 "on" if use_prior else "off")
    return plan


def setup_imbalance(loss: LossConfig, sampler: str, splits: DatasetSplits, model: torch.nn.Module,
                    run_dir: Path) -> dict:
    """The run's class weights and prior-bias init from `loss` and `dataset.sampler`; writes class_weights.json
    (rank 0) and returns the plan."""
    mode = _plain(loss.class_weights)
    counts = splits.train.counts()
    plan = plan_imbalance([counts[k] for k in splits.classes], splits.classes, class_weights=mode,
                          beta=loss.beta, sampler=sampler, prior_bias=loss.prior_bias)
    if plan["prior_bias"]["enabled"]:
        plan["prior_bias"]["bias"] = init_prior_bias(model, list(plan["prior_bias"]["prior"].values()))
    if distributed.is_main():
        write_json(run_dir / "class_weights.json", plan)
    return plan


def weight_tensor(plan: dict) -> torch.Tensor | None:
    """The imbalance plan's class weights as the loss takes them; None where the loss is unweighted."""
    if plan["class_weights"] == "none":
        return None
    return torch.tensor(list(plan["weights"].values()), dtype=torch.float32)


def _plain(value):
    """A {class: weight} config node as a plain dict (a mode string as it is)."""
    return dict(value) if isinstance(value, Mapping) else value
