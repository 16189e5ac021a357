"""Frozen layers run once: a partial fine-tune trains its unfrozen top on activations cached at the freeze
boundary (`trainer.boundary_cache`).

`split_at_boundary(model, sample)` traces one eval forward and finds the boundary: the first module (in call
order) whose parameters all train. Every module that finished before it is the frozen prefix. The returned
`BoundarySplit` has
  - `capture(images)`: the prefix's output (the boundary module's input), the rest of the forward skipped;
  - `top`: a view of the model that shares its modules and parameters, with the prefix replaced by identities,
    so `top(capture(x)) == model(x)`. Training `top` trains the model itself: its state dict, checkpoints and
    exports stay the full model's.
The split is checked on the sample (eval mode, both outputs compared); a backbone whose forward does work outside
modules before the boundary fails that check and is trained the usual way (None, with the reason logged).

`cache_boundary(...)` fills the cache: val once under the eval transform, train under `views` passes (the eval
transform first, then `views - 1` passes of the train transform), stored as float16 and bounded by the memory
budget. `BoundaryViews` draws one of an image's cached views each time it is read, as `features.augmented_views`
does for the probe.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import torch

from pipeline.config.schema import AugmentConfig, TrainerConfig
from pipeline.data import sampler
from pipeline.data.loaders import TrainingData, timed_train_batch
from pipeline.runtime import distributed
from pipeline.runtime.devices import Accel
from pipeline.training import mixing

_logger = logging.getLogger(__name__)

CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-4  # top(capture(x)) against model(x), fp32 on the sample


class _Captured(Exception):
    """Raised by the boundary's pre-hook to end the forward once the prefix's output is known."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


@dataclass
class BoundarySplit:
    model: torch.nn.Module
    boundary: str  # the first module of the trainable top
    prefix: list[str]  # the outermost frozen modules replaced in `top`
    top: torch.nn.Module
    shape: tuple[int, ...]  # one image's activation at the boundary

    def capture(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output for `images` (no grad; the model's modes as they are)."""
        module = self.model.get_submodule(self.boundary)

        def hook(mod, args):
            raise _Captured(args[0])

        handle = module.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                self.model(images)
        except _Captured as c:
            return c.value
        finally:
            handle.remove()
        raise RuntimeError(f"boundary module {self.boundary} was not called")  # the trace said it is

    def bytes_per_image(self) -> int:
        return 2 * math.prod(self.shape)  # float16


def _trace(model: torch.nn.Module, sample: torch.Tensor) -> dict[str, tuple[int, int]]:
    """{module name: (call start, call end)} over one eval forward of `sample` (first call of each)."""
    order: dict[str, list[int]] = {}
    tick = [0]
    handles = []

    def stamp(name: str, slot: int):
        def hook(*_):
            tick[0] += 1
            order.setdefault(name, [0, 0])
            if slot == 0 and order[name][0] == 0:
                order[name][0] = tick[0]
            elif slot == 1 and order[name][1] == 0:
                order[name][1] = tick[0]
        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(stamp(name, 0)))
            handles.append(module.register_forward_hook(stamp(name, 1)))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return {n: (s, e) for n, (s, e) in order.items()}


def _all_train(module: torch.nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.requires_grad for p in params)


def _view_without(model: torch.nn.Module, prefix: list[str]) -> torch.nn.Module:
    """A shallow copy of `model` sharing every module and parameter, with the modules `prefix` names replaced
    by identities (the containers on their paths are copied, so `model` itself is unchanged)."""
    top = copy.copy(model)
    top._modules = dict(model._modules)
    copied = {"": top}
    for path in prefix:
        parts = path.split(".")
        node, at = top, ""
        for part in parts[:-1]:
            at = f"{at}.{part}" if at else part
            if at not in copied:
                child = copy.copy(node._modules[part])
                child._modules = dict(child._modules)
                node._modules[part] = copied[at] = child
            node = copied[at]
        node._modules[parts[-1]] = torch.nn.Identity()
    return top


def split_at_boundary(model: torch.nn.Module, sample: torch.Tensor) -> tuple[BoundarySplit | None, str]:
    """(the split, why) or (None, why not): see the module docstring. `sample`: a batch of eval images."""
    was_training = model.training
    model.eval()
    try:
        calls = _trace(model, sample)
        named = dict(model.named_modules())
        tops = [n for n in calls if _all_train(named[n])]
        if not tops:
            return None, "no module trains"
        boundary = min(tops, key=lambda n: calls[n][0])
        start = calls[boundary][0]
        ran_before = {n for n, (s, e) in calls.items() if 0 < e < start}
        prefix = [n for n in ran_before if n.rpartition(".")[0] not in ran_before]
        if not prefix:
            return None, "nothing is frozen before the first trainable module"
        split = BoundarySplit(model, boundary, sorted(prefix, key=lambda n: calls[n][0]),
                              _view_without(model, prefix), ())
        acts = split.capture(sample)
        with torch.no_grad():
            full, cut = model(sample), split.top(acts)
        if not torch.allclose(full.float(), cut.float(), rtol=CHECK_RTOL, atol=CHECK_ATOL):
            return None, (f"the top from {boundary} does not reproduce the model's output (max difference "
                          f"{(full - cut).abs().max().item():.2e}): the forward does work outside its modules")
        split.shape = tuple(acts.shape[1:])
        return split, f"frozen prefix {', '.join(split.prefix)}; the top starts at {boundary}"
    finally:
        model.train(was_training)


class BoundaryViews(torch.utils.data.Dataset):
    """Cached boundary activations [views, images, ...] with labels. A read of (index, seed) from the train
    sampler (data/sampler.SeededSampler) takes view `seed % views`, so a resume replays the same draws; a plain
    index reads view 0 (the eval transform's)."""

    transform = None  # no albumentations RNG to save in last.pt (training/resume.py)

    def __init__(self, acts: torch.Tensor, labels: torch.Tensor):
        self.acts, self.labels = acts, labels

    def __len__(self) -> int:
        return self.acts.shape[1]

    def __getitem__(self, item: int | tuple[int, int]):
        i, seed = item if isinstance(item, tuple) else (item, 0)
        return self.acts[seed % self.acts.shape[0], i].float(), self.labels[i]


def cache_boundary(split: BoundarySplit, loaders: list, accel: Accel) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(activations [views, images, ...] float16, labels, seconds) of the prefix over each loader in `loaders`
    (one per view, the same images in the same order: a sequential loader). Files no loader could read are
    dropped by the collate function as in training; every view must keep the same images."""
    start = time.perf_counter()
    views, labels = [], None
    split.model.eval()
    for loader in loaders:
        acts, ys = [], []
        for batch in loader:
            if batch is None:
                continue
            acts.append(split.capture(accel.images(batch[0])).to("cpu", torch.float16).contiguous())
            ys.append(batch[1])
        y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
        if labels is not None and not torch.equal(labels, y):
            raise RuntimeError("augmented views of the boundary cache read different images")
        labels = y
        views.append(torch.cat(acts) if acts else torch.zeros((0, *split.shape), dtype=torch.float16))
    return torch.stack(views), labels, time.perf_counter() - start


def boundary_blocker(mode: str, *, trainer: TrainerConfig, augment: AugmentConfig, bn: str) -> str | None:
    """Why a fine-tune in `mode` cannot train on cached boundary activations, or None."""
    reasons = {"trainer.boundary_cache=never": trainer.boundary_cache == "never",
               f"strategy mode {mode} (partial and finetune only)": mode not in ("partial", "finetune"),
               "trainer.ema": trainer.ema, "trainer.compile": trainer.compile, "mixup/cutmix": mixing.build_mixer(
                   augment, 2) is not None, "torchrun": distributed.world_size() > 1,
               f"strategy.bn={bn} (frozen BN only)": bn != "frozen"}
    return next((why for why, blocked in reasons.items() if blocked), None)


def make_boundary_loaders(split: BoundarySplit, data: TrainingData, *, views: int, accel: Accel) -> dict:
    """Train and val loaders over activations at `split`'s boundary: val once under the eval transform, train
    under `views` passes (`trainer.boundary_views`: the eval transform's, then augmented ones with per-image
    seeds)."""
    s, splits = data.settings, data.splits
    train_passes = [data.image_pass(splits.train, data.eval_tf) if v == 0 else
                    data.image_pass(splits.train, data.train_tf, seed=s.seed + v) for v in range(views)]
    acts, labels, seconds = cache_boundary(split, train_passes, accel)
    val_acts, val_labels, val_seconds = cache_boundary(split, [data.image_pass(splits.val, data.eval_tf)], accel)
    _logger.info("Boundary cache at %s: %d train images x %d view(s) and %d val images (%.0f MB) in %.1f s",
                 split.boundary, acts.shape[1], views, val_acts.shape[1],
                 (acts.numel() + val_acts.numel()) * 2 / 2**20, seconds + val_seconds)
    generator = torch.Generator().manual_seed(s.seed)
    order = sampler.distributed_sampler(len(labels), sampler.build_sampler(labels.tolist(), s.sampler, seed=s.seed),
                                        train=True, generator=generator, rank=0, world=1)
    train = torch.utils.data.DataLoader(BoundaryViews(acts, labels), batch_size=s.batch_size, sampler=order,
                                        generator=generator)
    val = torch.utils.data.DataLoader(BoundaryViews(val_acts, val_labels), batch_size=s.eval_batch_size)
    return {"train": train, "val": val}


def split_for_fine_tune(model: torch.nn.Module, data: TrainingData, accel: Accel, *,
                        blocker: str | None) -> BoundarySplit | None:
    """`trainer.boundary_cache=always`: the model's boundary split, traced on two train images, or None with why
    (`blocker`: what rules it out, boundary_blocker)."""
    got = None if blocker else timed_train_batch(data.splits, data.eval_tf, data.settings, data.cache)
    split, why = (None, blocker or "no train image decoded") if got is None else \
        split_at_boundary(model, accel.images(got[0][0][:2]))
    _logger.info("trainer.boundary_cache=always: %s", why if split is not None else f"not used ({why})")
    return split
