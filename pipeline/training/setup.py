"""Run set-up for the train entry point: run dir, data and loaders, caches, imbalance plan and strategy."""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.data import augment, folder, image_cache, listing, manifest, sampler, sources
from pipeline.data.device_decode import DeviceBatches, resolve_decode
from pipeline.model import freezing
from pipeline.runtime import distributed, run_lock
from pipeline.runtime.devices import Accel
from pipeline.runtime.files import clean_stale_temps, ensure_writable_dir, write_json, write_text
from pipeline.runtime.seeding import seed_worker
from pipeline.training import boundary, loss, mixing, resume, validate
from pipeline.transfer import auto

_logger = logging.getLogger(__name__)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """The run dir: `output_dir`, else Hydra's (conf/hydra/default.yaml), else outputs/runs/<time>_<pid>."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else \
        Path("outputs/runs") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"


def claim_run_dir(cfg: DictConfig, *, resume: bool) -> Path:
    """Create, check and lock the run dir (runtime/run_lock.py: one live run per dir, a fresh run never in a dir
    that holds one), then write Hydra's record of this command (`.hydra/`) into it."""
    run_dir = ensure_writable_dir(resolve_run_dir(cfg))
    run_lock.claim(run_dir, resume=resume)
    if not resume:
        write_hydra_record(run_dir, cfg)
    clean_cache_temps(cfg)
    return run_dir


def clean_cache_temps(cfg: DictConfig) -> None:
    """Temp files that killed runs left in the feature and image caches (the run dir's own: run_lock.claim)."""
    dirs = [Path(d) for d in (cfg.features.cache_dir, cfg.dataset.cache_dir) if d]
    for d in dirs + [sub for d in dirs if d.is_dir() for sub in d.iterdir() if sub.is_dir()]:
        clean_stale_temps(d)


def write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/{config,hydra,overrides}.yaml` as Hydra writes them. conf/hydra/default.yaml sets
    `hydra.output_subdir: null` so that Hydra itself never rewrites the record of a run whose dir is refused."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    hydra_cfg = HydraConfig.get()
    record = {"config.yaml": cfg, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
              "overrides.yaml": hydra_cfg.overrides.task}
    for name, node in record.items():
        write_text(run_dir / ".hydra" / name, OmegaConf.to_yaml(node))


def dataset_root(cfg: DictConfig) -> Path:
    """The dataset root (sources.prepare_root: generated, downloaded or checked); the CSV's folder for a manifest."""
    d = cfg.dataset
    return sources.prepare_root(name=d.name, root=OmegaConf.select(d, "root", throw_on_missing=False),
                                source=d.source, image_size=d.image_size, url=d.url, download=d.download,
                                download_hint=d.download_hint, train_split=d.train_split, manifest=d.manifest)


def list_data(cfg: DictConfig) -> tuple[listing.Listing, Path]:
    """The dataset's files and labels by name, no file read (make preview)."""
    d = cfg.dataset
    root = dataset_root(cfg)
    return listing.list_source(root, train_split=d.train_split, val_split=d.val_split, test_split=d.test_split,
                               manifest=d.manifest), root


def build_data(cfg: DictConfig) -> tuple[folder.DatasetSplits, Path]:
    """List, check, probe and split the dataset (train/ tree, class folders or `dataset.manifest`)."""
    d = cfg.dataset
    root = dataset_root(cfg)
    layout = dict(train_split=d.train_split, val_split=d.val_split, test_split=d.test_split,
                  val_fraction=d.val_fraction, test_fraction=d.test_fraction, manifest=d.manifest)
    folder.check_layout(root, min_per_class=d.min_per_class, **layout)  # a listing: fails before any file is read
    splits = folder.load_imagefolder(root, seed=cfg.seed, max_pixels=d.max_pixels, min_per_class=d.min_per_class,
                                     workers=d.audit_workers, **layout)
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        if split is not None:
            _logger.info("%s: %d images %s", name, len(split), split.counts())
    return splits, root


def write_split(run_dir: Path, splits: folder.DatasetSplits) -> Path:
    """`split.csv`: every image the run uses, with its label and split (data/manifest.py); given back as
    `dataset.manifest`, it reproduces this split exactly."""
    return manifest.write_split_csv(run_dir / manifest.SPLIT_CSV, splits.rows())


def make_eval_loader(split: folder.Split, eval_tf, cfg: DictConfig, data_cfg: dict, device: torch.device, *,
                     cache=None, skip_log=None):
    """Val/test batches: preprocessed on the device when `dataset.decode` resolves to gpu (one process), else the
    CPU DataLoader (data/device_decode.py)."""
    if resolve_decode(cfg.dataset.decode, device) == "gpu" and distributed.world_size() == 1:
        return DeviceBatches(split, data_cfg, device, cfg.trainer.eval_batch_size, max_pixels=cfg.dataset.max_pixels,
                             skip_log=skip_log)
    return make_loader(split, eval_tf, cfg, train=False, cache=cache, skip_log=skip_log)


def make_loader(split: folder.Split, transform, cfg: DictConfig, *, train: bool, generator=None, cache=None,
                skip_log=None):
    """DataLoader over `split`; `cache` = decoded-image cache, `skip_log` = file listing run-time skips."""
    t = cfg.trainer
    dataset = folder.ImageDataset(split, transform, cfg.dataset.max_pixels, cache=cache, skip_log=skip_log)
    order = sampler.build_sampler(split.labels, cfg.dataset.sampler, seed=cfg.seed) if train else None
    order = sampler.distributed_sampler(len(dataset), order, train=train, generator=generator,  # (index, seed)
                                        rank=distributed.rank(), world=distributed.world_size())
    if train:  # the workers' base seed from a generator of its own: `generator` gives order and augmentation seeds
        generator = torch.Generator().manual_seed(cfg.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=distributed.local_batch_size(t.batch_size) if train else t.eval_batch_size,
        sampler=order, drop_last=False, num_workers=t.num_workers,
        collate_fn=functools.partial(folder.collate_skip_none, channels_last=t.channels_last),
        generator=generator, worker_init_fn=seed_worker, persistent_workers=t.num_workers > 0,
        pin_memory=torch.cuda.is_available())


def fork_workers_early(loader) -> None:
    """Start a persistent DataLoader's workers now, while the process is small: workers forked after training has
    grown the heap share its pages copy-on-write, and the next train step then copies them (8-10 s on 2 cores)."""
    if isinstance(loader, torch.utils.data.DataLoader) and loader.persistent_workers:
        iter(loader)


RUNTIME_SKIP_LOG = "skipped_at_runtime.jsonl"


def build_image_cache(cfg: DictConfig, splits: folder.DatasetSplits, data_cfg: dict, *, repeated: bool):
    """`dataset.cache`: decoded images at the short side the eval resize needs (None when off). `repeated`: the
    images are read every epoch (fine-tuning), which is when `auto` caches them. Returns (cache, resolved mode)."""
    d = cfg.dataset
    paths = [p for split in (splits.train, splits.val, splits.test) if split is not None for p in split.paths]
    short_side, workers = augment.eval_resize_size(data_cfg), max(1, torch.get_num_threads())
    mode = d.cache if d.cache != "auto" else image_cache.resolve_auto(
        paths, short_side, repeated=repeated, ram_fraction=d.cache_ram_fraction, workers=workers)
    return image_cache.build_cache(mode, paths=paths, short_side=short_side, interpolation=data_cfg["interpolation"],
                                   max_pixels=d.max_pixels, cache_dir=d.cache_dir, workers=workers), mode


def checkpoint_meta(cfg: DictConfig, classes: list[str], data_cfg: dict, epoch: int, val: dict) -> dict:
    return {"arch": cfg.backbone.name, "num_classes": len(classes), "class_names": classes,
            "preprocessing": data_cfg, "epoch": epoch, "val_metrics": val,
            "config": OmegaConf.to_container(cfg, resolve=True)}


def setup_imbalance(cfg: DictConfig, splits: folder.DatasetSplits, model: torch.nn.Module, run_dir: Path) -> dict:
    """Class weights + prior-bias init (training/loss.py); writes class_weights.json and returns the plan."""
    c = cfg.loss
    mode = OmegaConf.to_container(c.class_weights) if isinstance(c.class_weights, DictConfig) else c.class_weights
    counts = splits.train.counts()
    plan = loss.plan_imbalance([counts[k] for k in splits.classes], splits.classes, class_weights=mode,
                               beta=c.beta, sampler=cfg.dataset.sampler, prior_bias=c.prior_bias)
    if plan["prior_bias"]["enabled"]:
        plan["prior_bias"]["bias"] = loss.init_prior_bias(model, list(plan["prior_bias"]["prior"].values()))
    if distributed.is_main():
        write_json(run_dir / "class_weights.json", plan)
    return plan


def setup_strategy(cfg: DictConfig, model: torch.nn.Module, splits: folder.DatasetSplits, eval_tf, device: torch.device,
                   run_dir: Path, *, resumed: bool = False) -> dict:
    """Resolve `strategy.mode=auto` (decision.json; a resumed run reuses its own) and freeze the model accordingly.
    Under `trainer.time_limit` the fine-tune's depth is planned later, after the probe (budgeted/auto_budget.py)."""
    s = cfg.strategy
    mode, depth, decision = s.mode, s.freeze_depth, None
    if mode == "auto":  # DDP: rank 0 decides, the others receive its decision
        decision = distributed.from_main(lambda: resume.saved_decision(run_dir) if resumed else
                                         auto.decide_strategy(
            model, splits.train, eval_tf, device, n_groups=len(freezing.layer_groups(model)), auto_cfg=s.auto,
            seed=cfg.seed))
        if cfg.trainer.time_limit is not None and not resumed:  # a resumed run keeps its own decision
            decision = auto.mode_under_time_limit(decision, s.auto.similar_freeze_depth)
        if distributed.is_main():
            auto.write_decision(run_dir, decision)
        mode, depth = decision["mode"], decision["freeze_depth"]
    info = freezing.apply_strategy(model, mode=mode, freeze_depth=depth, bn=s.bn)
    return {**info, "decision": decision}


def boundary_blocker(cfg: DictConfig, mode: str) -> str | None:
    """Why a fine-tune in `mode` cannot train on cached boundary activations (training/boundary.py), or None."""
    t = cfg.trainer
    reasons = {"trainer.boundary_cache=never": t.boundary_cache == "never",
               f"strategy mode {mode} (partial and finetune only)": mode not in ("partial", "finetune"),
               "trainer.ema": t.ema, "trainer.compile": t.compile, "mixup/cutmix": mixing.build_mixer(
                   cfg.augment, 2) is not None, "torchrun": distributed.world_size() > 1,
               f"strategy.bn={cfg.strategy.bn} (frozen BN only)": cfg.strategy.bn != "frozen"}
    return next((why for why, blocked in reasons.items() if blocked), None)


def timed_train_batch(splits: folder.DatasetSplits, train_tf, cfg: DictConfig, cache=None):
    """(one train batch (images, labels), the loader's seconds per image, decode and augmentation included), or
    None where no image of the batch decodes: what the time-budget plan times a train step on."""
    t = cfg.trainer
    dataset = folder.ImageDataset(splits.train, train_tf, cfg.dataset.max_pixels, cache=cache)
    n = min(distributed.local_batch_size(t.batch_size), len(splits.train))
    begin = time.perf_counter()
    batch = folder.collate_skip_none([dataset[i] for i in range(n)], channels_last=t.channels_last)
    return None if batch is None else ((batch[0], batch[1]), (time.perf_counter() - begin) / max(len(batch[1]), 1))


def make_boundary_loaders(split: boundary.BoundarySplit, splits: folder.DatasetSplits, train_tf, eval_tf,
                          cfg: DictConfig, *, accel: Accel, cache=None, skip_log=None) -> dict:
    """Train and val loaders over activations at `split`'s boundary: val once under the eval transform, train
    under `trainer.boundary_views` passes (the eval transform's, then augmented ones with per-image seeds)."""
    t, views = cfg.trainer, cfg.trainer.boundary_views

    def image_pass(part: folder.Split, transform, view: int):
        dataset = folder.ImageDataset(part, transform, cfg.dataset.max_pixels, cache=cache, skip_log=skip_log)
        order = sampler.SeededSampler(torch.utils.data.SequentialSampler(range(len(dataset))),
                                      torch.Generator().manual_seed(cfg.seed + view)) if view else None
        return torch.utils.data.DataLoader(
            dataset, batch_size=t.eval_batch_size, sampler=order, num_workers=t.num_workers,
            collate_fn=functools.partial(folder.collate_skip_none, channels_last=t.channels_last),
            worker_init_fn=seed_worker)

    train_passes = [image_pass(splits.train, eval_tf if v == 0 else train_tf, v) for v in range(views)]
    acts, labels, seconds = boundary.cache_boundary(split, train_passes, accel)
    val_acts, val_labels, val_seconds = boundary.cache_boundary(split, [image_pass(splits.val, eval_tf, 0)], accel)
    _logger.info("Boundary cache at %s: %d train images x %d view(s) and %d val images (%.0f MB) in %.1f s",
                 split.boundary, acts.shape[1], views, val_acts.shape[1],
                 (acts.numel() + val_acts.numel()) * 2 / 2**20, seconds + val_seconds)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = sampler.distributed_sampler(len(labels), sampler.build_sampler(labels.tolist(), cfg.dataset.sampler,
                                                                           seed=cfg.seed),
                                        train=True, generator=generator, rank=0, world=1)
    train = torch.utils.data.DataLoader(boundary.BoundaryViews(acts, labels), batch_size=t.batch_size,
                                        sampler=order, generator=generator)
    val = torch.utils.data.DataLoader(boundary.BoundaryViews(val_acts, val_labels), batch_size=t.eval_batch_size)
    return {"train": train, "val": val}


def prepare_run(cfg: DictConfig) -> tuple[dict | None, Path]:
    """Resume state and run dir. Under torchrun rank 0 alone resolves them (it alone touches files) and the
    other ranks receive them (and the resumed run's config); they also show no progress bars."""
    distributed.init_from_env()
    main = distributed.is_main()
    resumed = resume.prepare_resume(cfg) if main else None  # trainer.resume: adopts the run's config and dir
    validate.validate_config(cfg)  # before any heavy work
    run_dir = distributed.main_run_dir(lambda: claim_run_dir(cfg, resume=resumed is not None))
    if resumed is not None:
        resume.drop_failure_record(run_dir)  # only now that this process holds the dir
    resumed = distributed.broadcast_object(resumed)
    if not main:
        if resumed is not None:
            resume.adopt_saved_config(cfg, resumed["config"], run_dir)
        cfg.trainer.progress = False
    return resumed, run_dir
