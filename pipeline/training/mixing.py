"""Mixup / CutMix on fine-tuning batches (timm.data.Mixup): mixed images and soft targets.

`augment.mixup` / `augment.cutmix` (Beta alphas, 0 = off; both on: one of the two per batch, switch_prob 0.5) and
`augment.mix_prob` (the share of batches mixed; the others keep their images, with one-hot targets). timm pairs
sample i with sample n-1-i, which needs an even batch: an odd batch (the last one, or after unreadable files were
dropped) mixes its first n-1 samples and keeps the last one as it is. Label smoothing is left to the training loss
(training/loss.py smooths soft and hard targets alike; mixing here does not, so nothing is smoothed twice). Mixup
draws from numpy's global RNG, seeded by `seed_everything` and saved in `last.pt`: runs and resumes repeat.
The cached linear probe (features/cached_fit.py) trains its head on fixed features and does not mix.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.data import Mixup

from pipeline.config.schema import AugmentConfig

_logger = logging.getLogger(__name__)


class BatchMixer:
    """(images, labels) -> (mixed images, soft targets (N, K) float) with timm's Mixup in 'batch' mode."""

    def __init__(self, *, mixup: float, cutmix: float, mix_prob: float, num_classes: int):
        self.num_classes = num_classes
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mix_prob, switch_prob=0.5, mode="batch",
                           label_smoothing=0.0, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        even = len(labels) - len(labels) % 2
        if even == len(labels):
            return self.mixup(images, labels)
        targets = F.one_hot(labels, self.num_classes).float()
        if even:
            mixed, targets[:even] = self.mixup(images[:even], labels[:even])
            images = torch.cat([mixed, images[even:]])
        return images, targets


def build_mixer(augment: AugmentConfig, num_classes: int) -> BatchMixer | None:
    """The batch mixer of the `augment` config, or None when mixing is off (both alphas 0, or mix_prob 0)."""
    if not (augment.mixup > 0 or augment.cutmix > 0):
        return None
    if augment.mix_prob <= 0:
        _logger.info("augment.mix_prob=0: mixup/cutmix off")
        return None
    alphas = (("mixup", augment.mixup), ("cutmix", augment.cutmix))
    on = " and ".join(f"{name} alpha {alpha:g}" for name, alpha in alphas if alpha > 0)
    _logger.info("Mixing %s of the training batches (%s%s); soft targets in the training loss",
                 f"{augment.mix_prob:.0%}", on,
                 ", one of the two per batch" if augment.mixup > 0 and augment.cutmix > 0 else "")
    return BatchMixer(mixup=augment.mixup, cutmix=augment.cutmix, mix_prob=augment.mix_prob, num_classes=num_classes)


def log_cached_probe_ignores_mixing(augment: AugmentConfig) -> None:
    """One log line when mixup/cutmix is set but the run takes the cached linear probe (fixed features: no mixing)."""
    if augment.mixup > 0 or augment.cutmix > 0:
        _logger.info("augment.mixup=%g / augment.cutmix=%g apply to fine-tuning only: the cached linear probe "
                     "(features.cached=true) trains without them", augment.mixup, augment.cutmix)
