"""Backbone ranking behind `make rank dataset=X backbones=[a,b,c]` (entry point: pipeline/rank.py), by LogME.

For each backbone: pretrained weights (`backbone.weights`, default auto), its own preprocessing, features
of every train image at every feature level plus the pre-logits `head` (cached like the linear-probe
path, so ranking then probing the winner extracts nothing twice), and LogME per level. Prints a table
and writes rank.md + rank.json to the run dir. A backbone whose weights cannot be had is listed as
skipped with the reason; the others are still ranked.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.data import augment
from pipeline.errors import PipelineError
from pipeline.features.cache import load_or_extract, weights_hash
from pipeline.features.cached_fit import extraction_workers, level_columns
from pipeline.model import backbone
from pipeline.model.multidepth import HEAD
from pipeline.runtime import owned
from pipeline.runtime.devices import select_device
from pipeline.runtime.files import write_json, write_text
from pipeline.runtime.process import set_threads
from pipeline.training.setup import build_data, resolve_run_dir
from pipeline.transfer.logme import logme_score

_logger = logging.getLogger(__name__)


def rank_backbone(name: str, splits, cfg: DictConfig, device: torch.device) -> list[dict]:
    """One row per feature level of `name`: dim, LogME, extraction time and speed."""
    b, t = cfg.backbone, cfg.trainer
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # random-init parts (and weights=none) are the same every run: cache hits
    model, weights_desc = backbone.build_backbone(name=name, num_classes=len(splits.classes), weights=b.weights,
                                                  cache_dir=b.cache_dir)
    model.to(device).eval()
    transform = augment.build_eval_transform(backbone.data_config(model, b.input_size or cfg.dataset.input_size))
    levels = list(range(len(model.feature_info))) + [HEAD]
    feats = load_or_extract(model, splits.train, transform, levels=levels, device=device,
                            key_parts={"arch": name, "weights": weights_hash(model), "transform": repr(transform)},
                            cache_dir=cfg.features.cache_dir or None, batch_size=t.eval_batch_size,
                            num_workers=extraction_workers(cfg.features.num_workers, t.num_workers, device),
                            channels_last=cfg.features.channels_last, name=name)
    x, y = feats["features"].numpy(), feats["labels"].numpy()
    rows = []
    for level, cols in level_columns(model, levels).items():
        tic = time.perf_counter()
        score = logme_score(x[:, cols], y)
        rows.append({"backbone": name, "weights": weights_desc, "level": str(level),
                     "module": "pre-logits" if level == HEAD else model.feature_info[level]["module"],
                     "dim": cols.stop - cols.start, "logme": score, "logme_seconds": time.perf_counter() - tic,
                     "images": int(len(y)), "cache": "hit" if feats["hit"] else "miss",
                     "extract_seconds": float(feats["extracted_seconds"]), "img_per_s": float(feats["img_per_s"]),
                     "total_seconds": time.perf_counter() - start})
    return rows


def render(rows: list[dict], skipped: list[dict], dataset: str) -> str:
    """rank.md: rows sorted by LogME (best first), then the skipped backbones."""
    lines = [f"# Backbone ranking on {dataset} (LogME on train features; higher is better)", "",
             "| rank | backbone | level | module | dim | LogME | extract s | img/s | cache |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(sorted(rows, key=lambda r: -r["logme"]), 1):
        lines.append(f"| {i} | {r['backbone']} | {r['level']} | {r['module']} | {r['dim']} | {r['logme']:.4f} | "
                     f"{r['extract_seconds']:.1f} | {r['img_per_s']:.1f} | {r['cache']} |")
    lines += ["", "On a cache hit, extraction time and img/s are those of the run that filled the cache."]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {s['backbone']}: {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def rank_backbones(cfg: DictConfig) -> dict:
    """Rank `cfg.backbones` (default: `backbone.name`) on the dataset's train split."""
    names = list(cfg.backbones) or [cfg.backbone.name]
    run_dir = owned.prepare_output_dir(resolve_run_dir(cfg), "rank", "choose a new dir (hydra.run.dir=... or "
                                       "output_dir=...)")
    set_threads(cfg.trainer.threads)
    device = select_device(cfg.trainer.device)
    splits, _ = build_data(cfg)
    rows, skipped = [], []
    for name in names:
        try:
            rows += rank_backbone(name, splits, cfg, device)
        except PipelineError as e:  # e.g. no weights offline: report, rank the others
            _logger.warning("Skipping %s: %s", name, e)
            skipped.append({"backbone": name, "reason": str(e)})
    if not rows:
        raise PipelineError(f"No backbone could be ranked: {skipped}")
    text = render(rows, skipped, cfg.dataset.name)
    write_text(run_dir / "rank.md", text)
    result = {"dataset": cfg.dataset.name, "rows": rows, "skipped": skipped, "run_dir": str(run_dir)}
    write_json(run_dir / "rank.json", result)
    print(text)
    _logger.info("Wrote %s", Path(run_dir) / "rank.md")
    return result
