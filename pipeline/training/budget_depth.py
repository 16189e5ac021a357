"""auto under `trainer.time_limit`: how deep small + different data's fine-tune goes, sized to the budget before
the fit starts. One train batch is timed on a copy of the model frozen to `strategy.auto.similar_freeze_depth`
(time_train_step), the steps that would fit are planned as the fit plans them (steps_that_fit, with
budget.plan_epochs), and transfer/auto.py `size_depth_to_budget` makes and records the choice."""
from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from pipeline.config.checks import parse_duration
from pipeline.data import folder
from pipeline.model import freezing
from pipeline.runtime import distributed
from pipeline.runtime.devices import Accel, prepare_model
from pipeline.training import budget
from pipeline.transfer import auto

TIMED_STEPS = 2  # steps timed after a warm-up one (time_train_step)

_logger = logging.getLogger(__name__)


def depth_for_budget(cfg: DictConfig, model: torch.nn.Module, splits: folder.DatasetSplits, eval_tf, decision: dict,
                     *, accel: Accel, started: float) -> dict:
    """auto.size_depth_to_budget with the train steps the time left fits at the deep depth: one train batch timed
    (time_train_step, on a copy frozen to that depth), then planned as the fit would plan it."""
    s, t = cfg.strategy, cfg.trainer
    deep = min(s.auto.similar_freeze_depth, decision["n_groups"])
    batch_size = min(distributed.local_batch_size(t.batch_size), len(splits.train))
    dataset = folder.ImageDataset(splits.train, eval_tf, cfg.dataset.max_pixels)
    batch = folder.collate_skip_none([dataset[i] for i in range(batch_size)], channels_last=t.channels_last)
    if batch is None:  # no image of the batch decoded: keep the rule's depth (the fit reports the files)
        return decision
    twin = copy.deepcopy(model)  # the model itself stays as it is: timing moves BN statistics
    freezing.freeze_to_depth(twin, deep, s.bn)
    timing = time_train_step(twin, batch[0], batch[1], accel)
    del twin
    fitting = steps_that_fit(
        t.time_limit, spent_s=budget.now() - started, timing=timing,
        steps_per_epoch=min(math.ceil(len(splits.train) / batch_size), t.max_train_batches or math.inf),
        train_images=len(splits.train), val_images=len(splits.val),
        test_images=len(splits.test) if splits.test is not None else 0, max_epochs=budget.max_epochs(t))
    decision = auto.size_depth_to_budget(decision, fitting_steps=fitting, min_steps=s.auto.deep_min_steps,
                                         deep_freeze_depth=deep, timing=timing)
    _logger.info("Auto under trainer.time_limit=%s: a train step with %d groups frozen took %.2f s, so about %d "
                 "steps fit: %s fine-tune (freeze_depth %d)", t.time_limit, deep, timing["step_s"], fitting,
                 decision["budget_depth"]["chosen"], decision["freeze_depth"])
    return decision


def time_train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, accel: Accel,
                    steps: int = TIMED_STEPS) -> dict:
    """Seconds of one train step's forward and backward (after a warm-up step) and of one no-grad forward on
    the batch `images`, with `model`'s trainable layers as they are. Its BatchNorm statistics move and its
    gradients are cleared (no optimizer step): give it a copy. Compute only: the loader, which runs beside the
    steps, and the optimizer update are not in it."""
    prepare_model(model, accel)  # the fit's memory format, so the same kernels run
    images, labels = accel.images(images), labels.to(accel.device)

    def step() -> None:
        with accel.autocast():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.train()
    step()
    begin = budget.now()
    for _ in range(steps):
        step()
    step_s = (budget.now() - begin) / steps
    model.eval()
    begin = budget.now()
    with torch.no_grad(), accel.autocast():
        model(images)
    return {"step_s": step_s, "forward_s": budget.now() - begin, "batch": len(labels)}


def steps_that_fit(limit: str, *, spent_s: float, timing: dict, steps_per_epoch: int, train_images: int,
                   val_images: int, test_images: int, max_epochs: int) -> int:
    """Train steps a fine-tune at `timing`'s speed (time_train_step) would plan in `limit` from `spent_s` on:
    first auto's probe (one forward pass over train and val for its features), then epochs of
    `steps_per_epoch` steps with a val evaluation each, then the test evaluation and the reports."""
    per_image = timing["forward_s"] / max(timing["batch"], 1)
    probe_s = (train_images + val_images) * per_image
    speed = budget.Speed(step_s=timing["step_s"], eval_s=val_images * per_image, checkpoint_s=0.0)
    epochs = budget.plan_epochs(limit_s=parse_duration("trainer.time_limit", limit), spent_s=spent_s + probe_s,
                                steps_per_epoch=steps_per_epoch, speed=speed, final_s=test_images * per_image,
                                max_epochs=max_epochs)
    return epochs * steps_per_epoch
