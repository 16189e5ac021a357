"""Label-error candidates: labelled images whose given class a probe on frozen backbone features doubts.

Every labelled image (train, val and test) is embedded once by the configured pretrained backbone (its
pre-logits features, through features/cache.py and keyed as the cached linear probe keys them, so the
probe path and a second audit extract nothing twice). A logistic-regression probe gives each image
out-of-fold class probabilities (stratified K-fold: no image is scored by a probe that saw it), and
cleanlab's `find_label_issues` (confident learning) flags the images whose given label is unlikely under
them, ranked by self-confidence (the probability of the given label, lowest first). A person looks at the
top candidates (label_issues.png, rendered by the entry points) and fixes the labels that are wrong.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config.schema import AuditConfig, BackboneConfig
from pipeline.data import augment
from pipeline.data.folder import DatasetSplits
from pipeline.features.cache import load_or_extract, model_key
from pipeline.features.cached_fit import FeatureSource
from pipeline.model import backbone

_logger = logging.getLogger(__name__)

PROBE_C = 0.1  # inverse L2 strength of the probe on standardised features: overconfident probes hide errors
SPLITS = ("train", "val", "test")


def audit_model(backbone_cfg: BackboneConfig, num_classes: int, *, input_size: int | None,
                grayscale_input: bool, seed: int) -> tuple[torch.nn.Module, object, str]:
    """(model, eval transform, weights description) of the `backbone` group `backbone_cfg` (`input_size`:
    dataset.input_size, where backbone.input_size is unset), as training would build them before its first step;
    random-init parts are seeded (`seed`) so repeated audits hit the feature cache."""
    torch.manual_seed(seed)
    model, weights_desc = backbone.build_backbone(name=backbone_cfg.name, num_classes=num_classes,
                                                  weights=backbone_cfg.weights, cache_dir=backbone_cfg.cache_dir)
    data_cfg = backbone.data_config(model, backbone_cfg.input_size or input_size)
    return model, augment.build_eval_transform(data_cfg, grayscale_input=grayscale_input), weights_desc


def out_of_fold_probs(x: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int) -> np.ndarray:
    """Class probabilities of each row from a standardised logistic-regression probe that never saw it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros((len(y), n_classes))
    for train_idx, test_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=1000))
        probe.fit(x[train_idx], y[train_idx])
        probs[np.ix_(test_idx, probe.classes_)] = probe.predict_proba(x[test_idx])
    return probs


def rank_label_issues(x: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int, seed: int) -> dict:
    """{"ranked": flagged row indices, most doubtful first, "probs": out-of-fold probabilities, "folds"}."""
    from cleanlab.filter import find_label_issues

    k = min(folds, int(np.bincount(y, minlength=n_classes).min()))
    if k < 2:
        return {"skipped": f"a class has fewer than 2 labelled images ({folds}-fold CV needs 2 or more per class)"}
    probs = out_of_fold_probs(x, y, n_classes, k, seed)
    ranked = find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    return {"ranked": [int(i) for i in ranked], "probs": probs, "folds": k}


def find_candidates(model: torch.nn.Module, splits: DatasetSplits, source: FeatureSource, *, audit: AuditConfig,
                    seed: int, weights_desc: str = "") -> dict:
    """The label-issue report (JSON-ready) of every labelled image, on features extracted as `source` says (the
    pre-logits of backbone `source.arch` under `source.eval_tf`); the top `audit.label_issues_top` candidates,
    `audit.folds`-fold probabilities seeded by `seed`."""
    start = time.perf_counter()
    model.to(source.how.device)
    key_parts = model_key(source.arch, model, source.eval_tf)
    xs, ys, where, hits = [], [], [], []
    for name in SPLITS:
        split = getattr(splits, name)
        if split is None or not len(split):
            continue
        out = load_or_extract(model, split, source.eval_tf, source.how, key_parts=key_parts, name=name)
        xs.append(out["features"].float().numpy())
        ys.append(out["labels"].long().numpy())
        where += [(name, split.paths[i]) for i in out["index"].tolist()]
        hits.append(bool(out["hit"]))
    x, y = np.concatenate(xs), np.concatenate(ys)
    ranked = rank_label_issues(x, y, len(splits.classes), folds=audit.folds, seed=seed)
    report = {"backbone": source.arch, "weights": weights_desc, "images": len(y), "dim": x.shape[1],
              "feature_cache": "hit" if all(hits) else "miss", "probe": f"logistic regression (C={PROBE_C})",
              "top": audit.label_issues_top}
    if "skipped" in ranked:
        return {**report, "skipped": ranked["skipped"], "flagged": 0, "candidates": []}
    probs, classes = ranked["probs"], splits.classes
    report.update(folds=ranked["folds"], flagged=len(ranked["ranked"]),
                  oof_accuracy=round(float((probs.argmax(1) == y).mean()), 4), candidates=[
                      {"split": where[i][0], "path": where[i][1], "given": classes[y[i]],
                       "suggested": classes[int(probs[i].argmax())], "p_given": round(float(probs[i, y[i]]), 4),
                       "p_suggested": round(float(probs[i].max()), 4)}
                      for i in ranked["ranked"][:audit.label_issues_top]])
    report["seconds"] = round(time.perf_counter() - start, 2)
    if report["flagged"]:
        _logger.warning("LABEL ISSUES: %d of %d labelled images look mislabelled to a probe on %s features (out-of-"
                        "fold); the top %d are in audit.json and label_issues.png", report["flagged"], len(y),
                        source.arch, len(report["candidates"]))
    return report


def label_issues_markdown(report: dict) -> list[str]:
    """The `### Label-error candidates` section (audit.md, summary.md)."""
    lines = ["### Label-error candidates", ""]
    if "skipped" in report:
        return lines + [f"- skipped: {report['skipped']}", ""]
    lines += [(f"- cleanlab (confident learning) flagged {report['flagged']} of {report['images']} labelled images, "
               f"on out-of-fold probabilities of a {report['probe']} probe ({report['folds']}-fold) on "
               f"{report['backbone']} features ({report['weights'] or 'configured weights'}; out-of-fold accuracy "
               f"{report['oof_accuracy']:.2f})"), ""]
    if report["candidates"]:
        lines += [(f"The {len(report['candidates'])} most doubtful, lowest probability of the given label first "
                   "(`label_issues.png`):"), "", "| # | file | split | given | suggested | p(given) | p(suggested) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | `{Path(c['path']).name}` | {c['split']} | {c['given']} | {c['suggested']} | "
                  f"{c['p_given']:.2f} | {c['p_suggested']:.2f} |" for k, c in enumerate(report["candidates"], 1)]
    return lines + [""]
