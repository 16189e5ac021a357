"""The one inference loop: a function of the images over every batch of a loader, outputs gathered on CPU.

Logits for evaluation (training/loop.py), pooled features for the cache (features/cache.py) and the auto
strategy's separability sample (transfer/separability.py) all run through `run_batches`. A batch is
`(images, labels, *extra)`; a `None` batch (no image of it decoded) is skipped. The caller puts the model in
eval mode (and its memory format); `accel` moves batches to the device and applies autocast.
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.runtime.devices import Accel


@torch.inference_mode()
def run_batches(fn: Callable[[torch.Tensor], torch.Tensor], loader, accel: Accel,
                on_batch: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(outputs, labels, extras) over `loader`: `fn(images)` as float on CPU, concatenated in loader order;
    `extras` holds each further batch field concatenated (e.g. sample indices). Empty tensors if nothing decoded."""
    outputs, labels, extras = [], [], []
    for batch in loader:
        if batch is not None:
            images, y, *rest = batch
            with accel.autocast():
                outputs.append(fn(accel.images(images)).float().cpu())
            labels.append(y)
            extras.append(rest)
        if on_batch is not None:
            on_batch()
    if not outputs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), []
    columns = [torch.cat([torch.as_tensor(e[i]) for e in extras]) for i in range(len(extras[0]))]
    return torch.cat(outputs), torch.cat(labels).long(), columns
