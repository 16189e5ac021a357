"""Run set-up for train.py: run dir, data and loaders, caches, imbalance plan, strategy and gradual thaws."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import augment, auto_strategy, data, distributed, gradual, image_cache, loss, plots, resume, sampler
from pipeline import sources, strategy, validate
from pipeline.seeding import seed_worker as _seed_worker

_logger = logging.getLogger(__name__)


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        path = Path(cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig
        path = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else \
            Path("outputs/runs") / time.strftime("%Y-%m-%d_%H-%M-%S")
    return validate.ensure_writable_dir(path)


def build_data(cfg: DictConfig) -> tuple[data.DatasetSplits, Path]:
    d = cfg.dataset
    root = sources.prepare_root(name=d.name, root=d.root, source=d.source, image_size=d.image_size, url=d.url,
                                download=d.download, download_hint=d.download_hint, train_split=d.train_split)
    validate.check_dataset_layout(root, train_split=d.train_split, val_split=d.val_split, val_fraction=d.val_fraction,
                                  min_per_class=d.min_per_class)  # a listing: fails before every file is probed
    splits = data.load_imagefolder(root, train_split=d.train_split, val_split=d.val_split, test_split=d.test_split,
                                   val_fraction=d.val_fraction, seed=cfg.seed, max_pixels=d.max_pixels,
                                   min_per_class=d.min_per_class, workers=d.audit_workers)
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        if split is not None:
            _logger.info("%s: %d images %s", name, len(split), split.counts())
    return splits, root


def make_loader(split: data.Split, transform, cfg: DictConfig, *, train: bool, generator=None, cache=None,
                skip_log=None):
    """DataLoader over `split`; `cache` = decoded-image cache, `skip_log` = file listing run-time skips."""
    t = cfg.trainer
    dataset = data.ImageDataset(split, transform, cfg.dataset.max_pixels, cache=cache, skip_log=skip_log)
    order = sampler.build_sampler(split.labels, cfg.dataset.sampler, seed=cfg.seed) if train else None
    order = sampler.distributed_sampler(len(dataset), order, train=train, generator=generator,  # DDP: a shard
                                        rank=distributed.rank(), world=distributed.world_size())
    return torch.utils.data.DataLoader(
        dataset, batch_size=distributed.local_batch_size(t.batch_size) if train else t.eval_batch_size,
        shuffle=train and order is None,
        sampler=order, drop_last=False, num_workers=t.num_workers, collate_fn=data.collate_skip_none,
        generator=generator,  # train workers are not persistent: each epoch's are seeded from `generator` (resume)
        worker_init_fn=_seed_worker, persistent_workers=t.num_workers > 0 and not train,
        pin_memory=torch.cuda.is_available())


RUNTIME_SKIP_LOG = "skipped_at_runtime.jsonl"


def build_image_cache(cfg: DictConfig, splits: data.DatasetSplits, data_cfg: dict):
    """`dataset.cache`: decoded images at the short side the eval resize needs (None when off)."""
    d = cfg.dataset
    paths = [p for split in (splits.train, splits.val, splits.test) if split is not None for p in split.paths]
    return image_cache.build_cache(d.cache, paths=paths, short_side=augment.eval_resize_size(data_cfg),
                                   interpolation=data_cfg["interpolation"], max_pixels=d.max_pixels,
                                   cache_dir=d.cache_dir, workers=max(1, torch.get_num_threads()))


def checkpoint_meta(cfg: DictConfig, classes: list[str], data_cfg: dict, epoch: int, val: dict) -> dict:
    return {"arch": cfg.backbone.name, "num_classes": len(classes), "class_names": classes,
            "preprocessing": data_cfg, "epoch": epoch, "val_metrics": val,
            "config": OmegaConf.to_container(cfg, resolve=True)}


def setup_imbalance(cfg: DictConfig, splits: data.DatasetSplits, model: torch.nn.Module, run_dir: Path) -> dict:
    """Class weights + prior-bias init (pipeline/loss.py); writes class_weights.json and returns the plan."""
    c = cfg.loss
    mode = OmegaConf.to_container(c.class_weights) if isinstance(c.class_weights, DictConfig) else c.class_weights
    counts = splits.train.counts()
    plan = loss.plan_imbalance([counts[k] for k in splits.classes], splits.classes, class_weights=mode,
                               beta=c.beta, sampler=cfg.dataset.sampler, prior_bias=c.prior_bias)
    if plan["prior_bias"]["enabled"]:
        plan["prior_bias"]["bias"] = loss.init_prior_bias(model, list(plan["prior_bias"]["prior"].values()))
    if distributed.is_main():
        (run_dir / "class_weights.json").write_text(json.dumps(plan, indent=2))
    return plan


def write_eval_reports(run_dir: Path, metrics: dict, evals: dict, classes: list[str], history: list) -> None:
    """Per split in `evals` ({split: (logits, labels)}): confusion PNG/CSV, text report, per-class metrics."""
    for split, (logits, labels) in evals.items():
        if len(labels):
            metrics[split]["per_class"] = plots.write_split_reports(run_dir, split, labels, logits.argmax(1), classes)
    plots.plot_curves(history, run_dir / "curves.png", metrics["monitor"])


def setup_strategy(cfg: DictConfig, model: torch.nn.Module, train_split: data.Split, eval_tf, device: torch.device,
                   run_dir: Path, resumed: bool = False) -> dict:
    """Resolve `strategy.mode=auto` (decision.json; a resumed run reuses its own) and freeze the model accordingly."""
    s = cfg.strategy
    mode, depth, decision = s.mode, s.freeze_depth, None
    if mode == "auto":  # DDP: rank 0 decides, the others receive its decision
        decision = distributed.from_main(lambda: resume.saved_decision(run_dir) if resumed else
                                         auto_strategy.decide_strategy(
            model, train_split, eval_tf, device, n_groups=len(strategy.layer_groups(model)), auto_cfg=s.auto,
            seed=cfg.seed))
        if distributed.is_main():
            auto_strategy.write_decision(run_dir, decision)
        mode, depth = decision["mode"], decision["freeze_depth"]
    info = strategy.apply_strategy(model, mode=mode, freeze_depth=depth, bn=s.bn)
    return {**info, "decision": decision}


def maybe_thaw(model, optimizer, scheduler, cfg: DictConfig, epoch: int) -> None:
    """`strategy.mode=gradual`: thaw layer groups from the top at this epoch's scheduled depth."""
    s, o = cfg.strategy, cfg.optim
    if s.mode != "gradual":
        return
    n_groups = len(strategy.layer_groups(model))
    floor = strategy.resolve_freeze_depth("partial", s.freeze_depth, n_groups)
    depth = gradual.gradual_depth(epoch, n_groups=n_groups, floor=floor, warmup_epochs=s.warmup_epochs,
                                  every=s.unfreeze_every, groups_per_step=s.unfreeze_groups)
    trainable_groups = [any(p.requires_grad for n, p in model.named_parameters() if n in set(g))
                        for g in strategy.layer_groups(model)]
    current = trainable_groups.index(True) if any(trainable_groups) else n_groups
    if depth < current:
        gradual.thaw_to_depth(model, optimizer, depth, bn=s.bn, lr=o.lr, backbone_lr_mult=o.backbone_lr_mult,
                              layer_decay=o.layer_decay, weight_decay=o.weight_decay)
        scheduler.refresh()
