"""Backbone ranking by LogME, behind `make rank dataset=X backbones=[a,b,c]` (the entry point: pipeline/rank.py).

For each backbone: pretrained weights (`backbone.weights`, default auto), its own preprocessing, features
of every train image at every feature level plus the pre-logits `head` (cached like the linear-probe
path, so ranking then probing the winner extracts nothing twice), and LogME per level. Prints a table
and writes rank.md + rank.json to the run dir. A backbone whose weights cannot be had is listed as
skipped with the reason; the others are still ranked.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.config.schema import BackboneConfig, DatasetConfig
from pipeline.data import augment
from pipeline.errors import PipelineError
from pipeline.features.cache import Extraction, load_or_extract, model_key
from pipeline.features.cached_fit import level_columns
from pipeline.model import backbone
from pipeline.model.multidepth import HEAD
from pipeline.runtime.files import write_json, write_text
from pipeline.transfer.logme import logme_score

_logger = logging.getLogger(__name__)


def rank_backbone(name: str, splits, how: Extraction, *, backbone_cfg: BackboneConfig,
                  dataset: DatasetConfig, seed: int) -> list[dict]:
    """One row per feature level of `name` (its weights and input size as the `backbone` group `backbone_cfg`
    and `dataset` say), features extracted as `how` says: dim, LogME, extraction time and speed."""
    start = time.perf_counter()
    torch.manual_seed(seed)  # random-init parts (and weights=none) are the same every run: cache hits
    model, weights_desc = backbone.build_backbone(name=name, num_classes=len(splits.classes),
                                                  weights=backbone_cfg.weights, cache_dir=backbone_cfg.cache_dir)
    model.to(how.device).eval()
    input_size = backbone_cfg.input_size or dataset.input_size
    transform = augment.build_eval_transform(backbone.data_config(model, input_size))
    levels = list(range(len(model.feature_info))) + [HEAD]
    feats = load_or_extract(model, splits.train, transform, replace(how, levels=levels),
                            key_parts=model_key(name, model, transform), name=name)
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


def rank_backbones(names: list[str], splits, how: Extraction, *, backbone_cfg: BackboneConfig,
                   dataset: DatasetConfig, seed: int, run_dir: Path) -> dict:
    """Rank the backbones `names` (rank_backbone) on the train split of `splits`; rank.md and rank.json in `run_dir`."""
    rows, skipped = [], []
    for name in names:
        try:
            rows += rank_backbone(name, splits, how, backbone_cfg=backbone_cfg, dataset=dataset, seed=seed)
        except PipelineError as e:  # e.g. no weights offline: report, rank the others
            _logger.warning("Skipping %s: %s", name, e)
            skipped.append({"backbone": name, "reason": str(e)})
    if not rows:
        raise PipelineError(f"No backbone could be ranked: {skipped}")
    text = render(rows, skipped, dataset.name)
    write_text(run_dir / "rank.md", text)
    result = {"dataset": dataset.name, "rows": rows, "skipped": skipped, "run_dir": str(run_dir)}
    write_json(run_dir / "rank.json", result)
    print(text)
    _logger.info("Wrote %s", Path(run_dir) / "rank.md")
    return result
