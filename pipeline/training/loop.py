"""The epoch loop: train_one_epoch / evaluate (torchvision-references style)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.model.inference import run_batches
from pipeline.runtime import distributed
from pipeline.runtime.devices import Accel


def progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not enabled, transient=True)


def _grads_finite(optimizer) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


@dataclass(frozen=True)
class TrainStep:
    """How each train step runs: the loss, the optimizer and its per-batch LR schedule, the precision (`accel`),
    and the optional parts: `guard` (pipeline.training.guard.StepGuard) clips gradients and skips non-finite
    steps, `mix(images, labels)` -> (images, targets) mixes the batch (training/mixing.py: mixup/cutmix, soft
    targets), `after_step()` runs after every optimizer step that was not skipped (the fit's weight average), and
    `stop()` true after a step ends the epoch early (SIGINT/SIGTERM, the time budget)."""
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: object
    accel: Accel
    guard: object = None
    mix: Callable | None = None
    after_step: Callable[[], None] | None = None
    stop: Callable[[], bool] | None = None


def _step(model, images, labels, step: TrainStep) -> float | None:
    """One optimizer step; None when the guard skipped it (non-finite inputs, loss or gradients) or the fp16
    GradScaler did (an overflow: the scaler lowers its scale; not a divergence, so the guard does not count it)."""
    optimizer, guard, accel = step.optimizer, step.guard, step.accel
    if guard is not None and not guard.inputs_ok(model, optimizer, images):
        return None
    with accel.autocast():
        loss = step.loss_fn(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler = accel.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if torch.isfinite(loss) and not _grads_finite(optimizer):
            scaler.update()
            return None
    else:
        loss.backward()
    if guard is not None and not guard.grads_ok(model, optimizer, loss, images):
        if scaler is not None:
            scaler.update()
        return None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.item()


def train_one_epoch(model: torch.nn.Module, loader, step: TrainStep, *, epoch: int = 0, max_batches: int = 0,
                    progress: bool = False, resume_from: dict | None = None) -> dict:
    """One pass over `loader`, each batch a `step` (skipped non-finite steps do not count in the loss); the
    scheduler steps per batch. Returns mean loss, images and seconds.

    Ended early by `step.stop()`, the result has `interrupted` and the `partial` counters; passed back as
    `resume_from`, they make a later call load (not train on) the batches already done, so data order and
    augmentation draws continue exactly.
    """
    model.train()
    accel, stop = step.accel, step.stop
    done = resume_from or {}
    skip, total_loss, seen = done.get("steps", 0), done.get("loss_sum", 0.0), done.get("seen", 0)
    skipped_steps, start = done.get("nonfinite_steps", 0), time.perf_counter() - done.get("seconds", 0.0)
    n_batches = min(len(loader), max_batches) if max_batches else len(loader)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"epoch {epoch}", total=n_batches, info="")
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            if i >= skip and distributed.all_true(batch is not None):  # None: all images unreadable
                images, labels = accel.images(batch[0]), batch[1].to(accel.device, non_blocking=True)
                images, targets = step.mix(images, labels) if step.mix is not None else (images, labels)
                loss = _step(model, images, targets, step)
                if loss is None:
                    skipped_steps += 1
                else:
                    total_loss += loss * len(labels)
                    seen += len(labels)
                    if step.after_step is not None:
                        step.after_step()
                step.scheduler.step()
            bar.update(task, advance=1, info=f"loss {total_loss / max(seen, 1):.4f}")
            if i >= skip and stop is not None and stop():
                partial = {"steps": i + 1, "loss_sum": total_loss, "seen": seen,
                           "nonfinite_steps": skipped_steps, "seconds": time.perf_counter() - start}
                return {"interrupted": True, "partial": partial}
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / seen if seen else (float("nan") if skipped_steps else 0.0), "train_images": seen,
            "train_seconds": seconds, "train_img_per_s": seen / max(seconds, 1e-9), "nonfinite_steps": skipped_steps}


def predict_logits(model: torch.nn.Module, loader, device: torch.device, progress: bool = False,
                   desc: str = "eval", accel: Accel | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over `loader` in eval mode (inference_mode, autocast/channels_last per `accel`)."""
    model.eval()
    with progress_bar(progress) as bar:
        task = bar.add_task(desc, total=len(loader), info="")
        logits, labels, _ = run_batches(model, loader, accel or Accel(device), lambda: bar.update(task, advance=1))
    if not len(labels):
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return logits.numpy(), labels.numpy()


def top5(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """{"top5_accuracy": share of labels among the 5 highest logits} with more than 5 classes, else {}."""
    if num_classes <= 5 or not len(labels):
        return {}
    best5 = np.argpartition(-np.asarray(logits), 4, axis=1)[:, :5]
    return {"top5_accuracy": float((best5 == np.asarray(labels)[:, None]).any(1).mean())}


def evaluate(model: torch.nn.Module, loader, loss_fn, accel: Accel, num_classes: int, *, progress: bool = False,
             desc: str = "eval") -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics (+ loss) over `loader` on `accel`'s device; also returns logits and labels for reports."""
    logits, labels = distributed.gather_arrays(*predict_logits(model, loader, accel.device, progress, desc,
                                                               accel))  # DDP
    return score_logits(logits, labels, loss_fn, num_classes), logits, labels


def score_logits(logits: np.ndarray, labels: np.ndarray, loss_fn, num_classes: int) -> dict:
    """The eval metrics (+ loss) of logits against labels."""
    from pipeline.training.metrics import classification_metrics

    if len(labels) == 0:
        return {"loss": float("nan"), "num_samples": 0}
    loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(labels)))
    metrics = classification_metrics(labels, logits.argmax(1), num_classes)
    return {"loss": loss, **metrics, **top5(logits, labels, num_classes)}
