"""Entry point: `python -m pipeline.train [overrides]`. `train(cfg)` runs one job and returns its metrics."""
from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError, PipelineError
from pipeline import augment, backbone, checkpoint, data, engine, loss, optim, sources, strategy, summary
from pipeline.config import register_configs
from pipeline.startup import set_threads

_logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device='{name}' is not valid; choose one of: auto, cpu, cuda")
    return torch.device(name)


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        path = Path(cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig
        path = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else \
            Path("outputs/runs") / time.strftime("%Y-%m-%d_%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_data(cfg: DictConfig) -> tuple[data.DatasetSplits, Path]:
    d = cfg.dataset
    root = sources.prepare_root(name=d.name, root=d.root, source=d.source, image_size=d.image_size, url=d.url,
                                download=d.download, download_hint=d.download_hint, train_split=d.train_split)
    splits = data.load_imagefolder(root, train_split=d.train_split, val_split=d.val_split, test_split=d.test_split,
                                   val_fraction=d.val_fraction, seed=cfg.seed, max_pixels=d.max_pixels,
                                   min_per_class=d.min_per_class, workers=d.audit_workers)
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        if split is not None:
            _logger.info("%s: %d images %s", name, len(split), split.counts())
    return splits, root


def make_loader(split: data.Split, transform, cfg: DictConfig, *, train: bool, generator=None):
    t = cfg.trainer
    dataset = data.ImageDataset(split, transform, cfg.dataset.max_pixels)
    return torch.utils.data.DataLoader(
        dataset, batch_size=t.batch_size if train else t.eval_batch_size, shuffle=train, drop_last=False,
        num_workers=t.num_workers, collate_fn=data.collate_skip_none, generator=generator,
        worker_init_fn=_seed_worker, persistent_workers=t.num_workers > 0,
        pin_memory=torch.cuda.is_available())


def checkpoint_meta(cfg: DictConfig, classes: list[str], data_cfg: dict, epoch: int, val: dict) -> dict:
    return {"arch": cfg.backbone.name, "num_classes": len(classes), "class_names": classes,
            "preprocessing": data_cfg, "epoch": epoch, "val_metrics": val,
            "config": OmegaConf.to_container(cfg, resolve=True)}


def fit(model, loaders: dict, cfg: DictConfig, run_dir: Path, meta: dict, device: torch.device) -> dict:
    """Epoch loop with best-checkpoint selection on `trainer.monitor`. Returns history and best epoch."""
    t, o = cfg.trainer, cfg.optim
    if t.epochs <= 0 or t.batch_size <= 0:
        raise ConfigError(f"trainer.epochs={t.epochs} and trainer.batch_size={t.batch_size} must be positive")
    groups = optim.build_param_groups(model, lr=o.lr, backbone_lr_mult=o.backbone_lr_mult,
                                      layer_decay=o.layer_decay, weight_decay=o.weight_decay)
    optimizer = optim.build_optimizer(groups, name=o.name, lr=o.lr, momentum=o.momentum)
    steps = len(loaders["train"]) if not t.max_train_batches else min(len(loaders["train"]), t.max_train_batches)
    scheduler = optim.build_scheduler(optimizer, name=o.scheduler, total_steps=steps * t.epochs,
                                      warmup_steps=int(o.warmup_epochs * steps))
    loss_fn = loss.build_loss(name=cfg.loss.name, label_smoothing=cfg.loss.label_smoothing)
    eval_loss = loss.build_loss(name=cfg.loss.name)
    history, best, best_epoch = [], -float("inf"), 0
    for epoch in range(1, t.epochs + 1):
        stats = engine.train_one_epoch(model, loaders["train"], loss_fn, optimizer, scheduler, device,
                                       epoch=epoch, max_batches=t.max_train_batches, progress=t.progress)
        val, _, _ = engine.evaluate(model, loaders["val"], eval_loss, device, meta["num_classes"], t.progress, "val")
        history.append({"epoch": epoch, **stats, **{f"val_{k}": v for k, v in val.items()}})
        improved = val[t.monitor] > best
        if improved:
            best, best_epoch = val[t.monitor], epoch
            checkpoint.save_checkpoint(run_dir, "best", model, {**meta, "epoch": epoch, "val_metrics": val})
        _logger.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  val_bal_acc %.4f  %.1f img/s%s",
                     epoch, t.epochs, stats["train_loss"], val["loss"], val["accuracy"], val["balanced_accuracy"],
                     stats["train_img_per_s"], "  *best*" if improved else "")
    return {"history": history, "best_epoch": best_epoch, "eval_loss": eval_loss}


def train(cfg: DictConfig) -> dict:
    """Run one training job described by `cfg`; writes the run dir and returns the metrics dict."""
    start = time.perf_counter()
    run_dir = resolve_run_dir(cfg)
    threads = set_threads(cfg.trainer.threads)
    device = select_device(cfg.trainer.device)
    generator = seed_everything(cfg.seed)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    splits, root = build_data(cfg)
    b = cfg.backbone
    model, weights_desc = backbone.build_backbone(name=b.name, num_classes=len(splits.classes), weights=b.weights,
                                                  drop_rate=b.drop_rate, drop_path_rate=b.drop_path_rate,
                                                  cache_dir=b.cache_dir)
    data_cfg = backbone.data_config(model, b.input_size or cfg.dataset.input_size)
    strategy_info = strategy.apply_strategy(model, mode=cfg.strategy.mode, freeze_depth=cfg.strategy.freeze_depth,
                                            bn=cfg.strategy.bn)
    model.to(device)
    a = cfg.augment
    train_tf = augment.build_train_transform(data_cfg, preset=a.preset, hflip=a.hflip, scale_min=a.scale_min)
    eval_tf = augment.build_eval_transform(data_cfg)
    loaders = {"train": make_loader(splits.train, train_tf, cfg, train=True, generator=generator),
               "val": make_loader(splits.val, eval_tf, cfg, train=False)}
    meta = checkpoint_meta(cfg, splits.classes, data_cfg, 0, {})
    result = fit(model, loaders, cfg, run_dir, meta, device)
    best_model, _ = checkpoint.load_checkpoint(run_dir, "best")
    best_model.to(device)
    metrics = {"run_dir": str(run_dir), "monitor": cfg.trainer.monitor, "best_epoch": result["best_epoch"],
               "val": result["history"][result["best_epoch"] - 1 if result["best_epoch"] else -1]}
    metrics["val"] = {k.removeprefix("val_"): v for k, v in metrics["val"].items() if k.startswith("val_")}
    if splits.test is not None and len(splits.test):
        test_loader = make_loader(splits.test, eval_tf, cfg, train=False)
        metrics["test"], _, _ = engine.evaluate(best_model, test_loader, result["eval_loss"], device,
                                                len(splits.classes), cfg.trainer.progress, "test")
    metrics.update(history=result["history"], train_seconds=time.perf_counter() - start, device=str(device),
                   threads=threads, skipped_files=len(splits.skipped))
    model_info = {"backbone": b.name, "weights": weights_desc, "preprocessing": data_cfg, **strategy_info}
    summary.write_run_files(run_dir, metrics, splits, cfg.dataset.name, str(Path(root).resolve()), model_info)
    _logger.info("Done in %.0f s: best epoch %d, val %s", metrics["train_seconds"], metrics["best_epoch"],
                 {k: round(v, 4) for k, v in metrics["val"].items() if isinstance(v, float)})
    _logger.info("Run dir: %s", run_dir)
    return metrics


@contextmanager
def exit_on_user_error():
    """A PipelineError is the user's to fix: one line on stderr, exit code 2, no traceback."""
    try:
        yield
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    with exit_on_user_error():
        metrics = train(cfg)
    return metrics["val"][cfg.trainer.monitor]


if __name__ == "__main__":
    main()
