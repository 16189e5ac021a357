"""Heads trained on cached features: a torch linear head (epochs, early stopping) or sklearn's logistic
regression (C by stratified CV). Where features are standardised for training (cached_fit decides), the
scaler is folded into the final Linear so the installed head works on raw backbone features and the full
model predicts the same.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from pipeline.data import sampler
from pipeline.errors import ConfigError
from pipeline.model.multidepth import MultiDepthClassifier, uses_plain_head
from pipeline.training.loop import top5
from pipeline.training.metrics import MonitorTracker, classification_metrics
from pipeline.training.tracking import group_lrs
from pipeline.transfer import optim

_logger = logging.getLogger(__name__)

CV_SCORING = {"balanced_accuracy": "balanced_accuracy", "accuracy": "accuracy", "macro_f1": "f1_macro",
              "loss": "neg_log_loss"}


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (std floored so constant features stay finite)."""
    return x.mean(0), np.maximum(x.std(0), 1e-6)


def fold_standardization(weight: np.ndarray, bias: np.ndarray, mu: np.ndarray,
                         sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W((x - mu) / sigma) + b  ==  (W / sigma) x + (b - (W / sigma) mu)."""
    w = weight / sigma[None, :]
    return w, bias - w @ mu


@contextlib.contextmanager
def single_thread():
    """One torch thread: a step of a Linear on cached features is too small to split, and threads only add their
    synchronisation (20 epochs of 2000 x 1280, batch 32, on a busy 2-core machine: 1.2 s with 1 thread, 15.5 s
    with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def evaluate_head(linear: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, loss_fn, num_classes: int) -> tuple:
    with torch.inference_mode():
        logits = linear(x)
        loss = float(loss_fn(logits, y))
    logits, labels = logits.numpy(), y.numpy()
    return {"loss": loss, **classification_metrics(labels, logits.argmax(1), num_classes),
            **top5(logits, labels, num_classes)}, logits


@dataclass(frozen=True)
class HeadData:
    """The rows a head trains on: train features `x` and labels `y`, the val rows, and the class count."""
    x: np.ndarray
    y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    num_classes: int


@dataclass(frozen=True)
class HeadTraining:
    """The linear head's own training: `epochs` of AdamW + cosine (`lr`, `weight_decay`) in batches of `batch_size`,
    drawn by the train `sampler` (shuffle | balanced); the best epoch by val `monitor`, early stop after
    `patience` epochs without gain (0: never); `seed` for the batches and the init."""
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    monitor: str = "balanced_accuracy"
    patience: int = 0
    seed: int = 0
    sampler: str = "shuffle"


def train_linear_head(data: HeadData, training: HeadTraining, *, loss_fn, eval_loss_fn,
                      init_bias: list[float] | None = None, on_epoch: Callable[[list], None] | None = None) -> dict:
    """AdamW + cosine on a zero-initialised Linear (bias `init_bias` where given), as `training` says; keeps the best
    epoch by val `training.monitor`; `on_epoch(history)` after each epoch (training/tracking.py).

    Returns {weight, bias, history, best_epoch, best_val: (val logits, val labels)}."""
    x, y, val_x, val_y, num_classes = data.x, data.y, data.val_x, data.val_y, data.num_classes
    epochs, batch_size, lr, weight_decay = training.epochs, training.batch_size, training.lr, training.weight_decay
    monitor, patience, seed = training.monitor, training.patience, training.seed
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    if init_bias is not None:
        linear.bias.data.copy_(torch.as_tensor(init_bias, dtype=torch.float32))
    tx, ty = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    vx, vy = torch.from_numpy(val_x).float(), torch.from_numpy(val_y).long()
    order = sampler.build_sampler(y.tolist(), training.sampler, seed=seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tx, ty), batch_size=batch_size,
                                         shuffle=order is None, sampler=order,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW([{"name": "head", "params": list(linear.parameters())}], lr=lr, weight_decay=weight_decay)
    schedule = optim.build_scheduler(opt, name="cosine", total_steps=len(loader) * epochs)
    tracker, history, best = MonitorTracker(monitor, patience), [], None
    log_every = max(1, epochs // 10)  # a converged head runs ~100 epochs: log 10 of them (all at DEBUG) + the best
    with single_thread():
        for epoch in range(1, epochs + 1):
            start, total, seen = time.perf_counter(), 0.0, 0
            for bx, by in loader:
                batch_loss = loss_fn(linear(bx), by)
                opt.zero_grad(set_to_none=True)
                batch_loss.backward()
                opt.step()
                schedule.step()
                total, seen = total + batch_loss.item() * len(by), seen + len(by)
            seconds = time.perf_counter() - start
            val, logits = evaluate_head(linear, vx, vy, eval_loss_fn, num_classes)
            history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "train_images": seen,
                            "train_seconds": seconds, "train_img_per_s": seen / max(seconds, 1e-9),
                            **{f"val_{k}": v for k, v in val.items()}, **group_lrs(opt)})  # LR at the epoch's end
            if on_epoch is not None:
                on_epoch(history)
            improved = tracker.update(val[monitor], epoch)
            if improved:
                best = (copy.deepcopy(linear.state_dict()), (logits, val_y))
            last = tracker.should_stop or epoch == epochs
            level = logging.INFO if epoch == 1 or epoch % log_every == 0 or last else logging.DEBUG
            _logger.log(level, "head epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  val_bal_acc %.4f  "
                        "lr %.2e%s", epoch, epochs, history[-1]["train_loss"], val["loss"], val["accuracy"],
                        val["balanced_accuracy"], history[-1]["lr_head"], "  *best*" if improved else "")
            if tracker.should_stop:
                _logger.info("Early stop at epoch %d: val %s best %.4f at epoch %d", epoch, monitor, tracker.best,
                             tracker.best_epoch)
                break
        _logger.info("Head: best val %s %.4f at epoch %d of %d run (%.1f s)", monitor, tracker.best,
                     tracker.best_epoch, len(history), sum(h["train_seconds"] for h in history))
    state, best_val = best
    return {"weight": state["weight"].numpy(), "bias": state["bias"].numpy(), "history": history,
            "best_epoch": tracker.best_epoch, "best_val": best_val}


def logistic_folds(y: np.ndarray, num_classes: int) -> int:
    """CV folds the logistic head can use: 3, or fewer when the smallest present class has fewer images."""
    counts = np.bincount(y, minlength=num_classes)
    return int(min(3, counts[counts > 0].min())) if counts.any() else 0


def resolve_head(setting: str, y: np.ndarray, num_classes: int) -> str:
    """`features.head`: auto = logistic (measured better, docs/recipe.md) where its CV can run (every present class
    has >= 2 train rows), else linear; linear / logistic as set."""
    if setting != "auto":
        return setting
    if logistic_folds(y, num_classes) >= 2:
        return "logistic"
    _logger.info("features.head=auto: a class has a single train image, too few for the logistic head's "
                 "cross-validation; the linear head trains instead")
    return "linear"


def fit_logistic_head(x: np.ndarray, y: np.ndarray, *, num_classes: int, class_weights: np.ndarray | None = None,
                      monitor: str = "balanced_accuracy", seed: int = 0) -> dict:
    """sklearn LogisticRegression with C chosen by stratified CV on (standardised) train features.

    Returns {weight, bias} as a `num_classes`-row softmax head, and the chosen C."""
    folds = logistic_folds(y, num_classes)
    if folds < 2:
        smallest = {c: int(n) for c, n in enumerate(np.bincount(y, minlength=num_classes)) if n < 2}
        raise ConfigError(f"features.head=logistic needs at least 2 train images in every class for its "
                          f"cross-validation (class index: count {smallest}); use features.head=linear or add images")
    weight_map = None if class_weights is None else {c: float(w) for c, w in enumerate(class_weights)}
    clf = LogisticRegressionCV(Cs=np.logspace(-3, 1, 5).tolist(), cv=StratifiedKFold(folds, shuffle=True,
                               random_state=seed), scoring=CV_SCORING[monitor], max_iter=1000,
                               class_weight=weight_map, random_state=seed)
    with warnings.catch_warnings():  # sklearn 1.8 announces attribute/default changes we do not depend on
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x, y)
    coef, intercept = clf.coef_, clf.intercept_
    weight, bias = np.zeros((num_classes, x.shape[1])), np.zeros(num_classes)
    if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])
        lo, hi = clf.classes_
        weight[lo], weight[hi] = -coef[0] / 2, coef[0] / 2
        bias[lo], bias[hi] = -intercept[0] / 2, intercept[0] / 2
    else:
        weight[clf.classes_], bias[clf.classes_] = coef, intercept
    c = float(np.atleast_1d(clf.C_)[0])
    _logger.info("Logistic head: C=%g chosen by %d-fold CV (%s)", c, folds, CV_SCORING[monitor])
    return {"weight": weight, "bias": bias, "C": c}


def install_head(model: torch.nn.Module, levels: list, weight: np.ndarray, bias: np.ndarray) -> torch.nn.Module:
    """The full model with the trained head: the backbone's own classifier, or a MultiDepthClassifier."""
    if uses_plain_head(levels):
        target = model.get_classifier()
    else:
        model = MultiDepthClassifier(model, levels, weight.shape[0])
        target = model.fc
    if not isinstance(target, torch.nn.Linear) or tuple(target.weight.shape) != weight.shape:
        raise ValueError(f"cannot install a {weight.shape} head into {type(target).__name__}")
    with torch.no_grad():
        target.weight.copy_(torch.as_tensor(weight, dtype=target.weight.dtype))
        target.bias.copy_(torch.as_tensor(bias, dtype=target.bias.dtype))
    return model
