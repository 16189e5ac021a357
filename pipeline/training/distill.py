"""Distillation's loss (`make distill`; the teacher and its cached logits: features/teacher.py).

Per batch (Hinton et al. 2015): (1 - alpha) * label loss + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)),
alpha = `distill.alpha`, T = `distill.temperature`. The label loss is the run's own (`loss` group: class weights,
smoothing). The student sees its augmented view, the teacher's logits are of the clean eval view.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config.schema import DistillConfig
from pipeline.errors import ConfigError

STUDENT_MODES = ("partial", "finetune", "gradual")  # the student trains on images, where the KD targets are


def check(distill: DistillConfig, *, mode: str, boundary_cache: str, mixing: bool) -> None:
    """What a distillation run cannot combine with, in one line each (at start-up)."""
    if not distill.teacher:
        return
    if mode not in STUDENT_MODES:
        raise ConfigError(f"distill.teacher is set with strategy={mode}: the student learns from the teacher on "
                          f"images, so use strategy={'|'.join(STUDENT_MODES)} (make distill sets partial)")
    if boundary_cache == "always":
        raise ConfigError("distill.teacher with trainer.boundary_cache=always: the cached activations carry no "
                          "teacher logits; use trainer.boundary_cache=auto or never")
    if mixing:
        raise ConfigError("distill.teacher with mixup/cutmix: a mixed image has no teacher logits; set "
                          "augment.mixup=0 and augment.cutmix=0")


class DistillLoss(torch.nn.Module):
    """(1 - alpha) * `label_loss` + alpha * T^2 * KL(teacher || student at T), averaged over the batch's rows that
    have teacher logits. `target`: rows of [label, teacher logits...] (from `teacher_targets`), or plain labels
    (a batch without teacher logits, e.g. the time budget's timed batch): the label loss alone."""

    def __init__(self, label_loss: torch.nn.Module, alpha: float, temperature: float):
        super().__init__()
        self.label_loss, self.alpha, self.temperature = label_loss, float(alpha), float(temperature)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point() or target.dim() != 2:
            return self.label_loss(logits, target)
        labels, teacher = target[:, 0].long(), target[:, 1:].float()
        label_term = self.label_loss(logits, labels)
        taught = ~torch.isnan(teacher).any(1)
        if self.alpha == 0 or not bool(taught.any()):
            return label_term
        t = self.temperature
        kd = F.kl_div(F.log_softmax(logits[taught].float() / t, dim=1), F.log_softmax(teacher[taught] / t, dim=1),
                      log_target=True, reduction="batchmean") * t * t
        return (1 - self.alpha) * label_term + self.alpha * kd


def wrap_loss(label_loss: torch.nn.Module, distill: DistillConfig) -> torch.nn.Module:
    """The training loss of a fit: `label_loss` itself, or its DistillLoss where `distill.teacher` is set."""
    if not distill.teacher:
        return label_loss
    return DistillLoss(label_loss, distill.alpha, distill.temperature)
