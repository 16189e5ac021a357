"""Dataset audit: counts, sizes, colour modes, odd files, exact and near duplicates, train/eval leakage and
storage shortcuts (docs/audit.md).

Works on the probe records `data.load_imagefolder` already made (one read per file: sha1 of the bytes,
header format/mode/size/storage facts, draft decode and its perceptual hash), so auditing costs no second
pass. Near-duplicates are data/near_duplicates.py's, shortcuts data/shortcuts.py's; the label-error check
needs a backbone and lives in features/label_issues.py. `python -m pipeline.audit dataset=X`
(pipeline/audit.py) writes `audit.json` + `audit.md`; training runs the same audit and puts it in the run dir.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.config.schema import AuditConfig
from pipeline.data import near_duplicates, shortcuts
from pipeline.data.folder import DatasetSplits, Split

_logger = logging.getLogger(__name__)

MAX_LISTED = 20  # examples per finding in audit.md (audit.json has all)
RARE_LABEL_IMAGES = 10  # audit.rare_label_images' default, for an audit without the config group
FEW_COLORS = 64  # a photo or scan has hundreds of distinct colours in a 64 px sample; a placeholder has few
LOUD_WARNINGS = ("DATA LEAKAGE", "SHORTCUT", "CONFOUND")  # warning lines `run_audit` logs as errors


def _splits(data: DatasetSplits) -> dict[str, Split]:
    return {n: s for n, s in (("train", data.train), ("val", data.val), ("test", data.test)) if s is not None}


def _spread(values: list[int]) -> dict:
    if not values:
        return {}
    return {"min": min(values), "median": int(statistics.median(values)), "max": max(values)}


def split_stats(split: Split, files: dict[str, dict], min_side: int = 0) -> dict:
    """Counts per class, formats, colour modes, size spread and grey-content files of one split."""
    recs = [files.get(p, {}) for p in split.paths]
    widths = [r["width"] for r in recs if "width" in r]
    heights = [r["height"] for r in recs if "height" in r]
    return {"images": len(split), "per_class": split.counts(),
            "formats": dict(Counter(r.get("format", "?") for r in recs)),
            "modes": dict(Counter(r.get("mode", "?") for r in recs)),
            "gray_content": sum(bool(r.get("gray_content")) for r in recs),
            "width": _spread(widths), "height": _spread(heights),
            "short_side_below_input": {"input": min_side, "count": sum(min(w, h) < min_side
                                                                       for w, h in zip(widths, heights))},
            "megabytes": round(sum(r.get("bytes", 0) for r in recs) / 2**20, 1)}


def find_duplicates(data: DatasetSplits) -> dict[str, list[dict]]:
    """Groups of byte-identical files: within one split, across splits (leakage), under different labels."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, split in _splits(data).items():
        for path, label in zip(split.paths, split.labels):
            sha = data.files.get(path, {}).get("sha1")
            if sha:
                groups[sha].append({"split": name, "class": "|".join(split.label_names(label)), "path": path})
    found: dict[str, list[dict]] = {"within_split": [], "cross_split": [], "label_conflicts": []}
    for sha, members in groups.items():
        if len(members) < 2:
            continue
        by_split = Counter(m["split"] for m in members)
        for name, n in by_split.items():
            if n > 1:
                found["within_split"].append({"sha1": sha, "split": name,
                                              "files": [m for m in members if m["split"] == name]})
        if len(by_split) > 1:
            found["cross_split"].append({"sha1": sha, "files": members})
        if len({m["class"] for m in members}) > 1:
            found["label_conflicts"].append({"sha1": sha, "files": members})
    return found


def stray_files(root: Optional[str | Path], kind: str) -> list[str]:
    """Files beside the class folders (e.g. `train/.DS_Store`, or `<root>/notes.txt` in a folder of class folders):
    never used. Files inside class folders that are not trained on are in the skipped list instead."""
    if root is None or not Path(root).is_dir() or kind == "manifest":
        return []
    parents = [Path(root)] if kind == "class_folders" else [d for d in Path(root).iterdir() if d.is_dir()]
    return sorted(str(entry) for parent in parents for entry in parent.iterdir() if entry.is_file())


def _warnings(report: dict) -> list[str]:
    s, out = report["summary"], []
    if s["eval_files_leaked"]:
        hint = ("removed from the eval splits (dataset.dedup=drop_from_eval)" if report["dedup"]["mode"] != "none"
                else "training scores them apart: its headline val/test metrics leave them out (data/leaks.py); "
                "dataset.dedup=drop_from_eval drops them")
        out.append(f"DATA LEAKAGE: {s['eval_files_leaked']} val/test file(s) are byte-identical to files of an "
                   f"earlier split ({s['cross_split_groups']} group(s)); {hint}")
    if s.get("eval_files_near_leaked"):
        hint = ("removed from the eval splits" if report["dedup"]["mode"] == "drop_near_from_eval" else
                "training scores them apart: its headline val/test metrics leave them out (data/leaks.py); "
                "dataset.dedup=drop_near_from_eval drops them")
        out.append(f"DATA LEAKAGE (near-duplicates): {s['eval_files_near_leaked']} val/test file(s) nearly identical "
                   f"to files of an earlier split ({s['near_duplicate_pairs']} pair(s) within "
                   f"{report['near_duplicates']['max_distance']} bits of perceptual hash: resized or re-encoded "
                   f"copies?); look at near_duplicates.png; {hint}")
    if s["label_conflict_groups"]:
        out.append(f"LABEL CONFLICT: {s['label_conflict_groups']} image(s) stored under two or more classes "
                   "(see audit.json 'label_conflicts'); fix the labels or delete the copies")
    if s["within_split_extra_copies"]:
        out.append(f"{s['within_split_extra_copies']} extra copies of identical files within a split "
                   f"({s['within_split_groups']} group(s)): they weigh those images more")
    if s["few_colors"]:
        out.append(f"{s['few_colors']} image(s) have <= {FEW_COLORS} distinct colours (placeholder, icon or blank "
                   "page?): look at them (audit.json 'few_colors')")
    stats = report["splits"].values()
    if stats and all(st["images"] and st["gray_content"] == st["images"] for st in stats):
        out.append("Hint: every image is greyscale (even if stored as RGB); augment.grayscale_input=true keeps "
                   "colour augmentations from inventing colours the data never has")
    if s["unreadable"]:
        out.append(f"{s['unreadable']} file(s) are not usable images and are skipped (listed in the report)")
    if "shortcuts" in report:
        out += shortcuts.shortcut_warning(report["shortcuts"]) + shortcuts.confound_warnings(report["shortcuts"])
    ml = report.get("multilabel")
    if ml and ml["rare"]:
        shown = ", ".join(f"{c} ({n})" for c, n in sorted(ml["rare"].items(), key=lambda kv: kv[1])[:MAX_LISTED])
        out.append(f"RARE LABELS: {len(ml['rare'])} label(s) have fewer than {ml['rare_below']} train images, too few "
                   f"to learn or to score: {shown}; add images carrying them, or drop those labels")
    if ml and ml["splits"]["train"]["no_label"]:
        out.append(f"{ml['splits']['train']['no_label']} train image(s) carry no label (negatives for every label)")
    return out


def trust_checks(data: DatasetSplits, checks, seed: int) -> dict:
    """The near-duplicate and shortcut parts of the report; `checks`: the `audit` config group. The shortcut
    checks compare classes, so multi-label data skips them (`shortcuts_skipped` says so)."""
    names, used = list(_splits(data)), [(p, y) for s in _splits(data).values() for p, y in zip(s.paths, s.labels)]
    pairs = near_duplicates.find_near_duplicates(data, checks.near_duplicate_distance)
    found = {"near_duplicates": {"max_distance": checks.near_duplicate_distance, "splits": names, "pairs": pairs}}
    if data.multilabel:
        return {**found, "shortcuts_skipped": "multi-label data: the storage-shortcut checks compare single classes"}
    return {**found, "shortcuts": shortcuts.find_shortcuts(
        [data.files[p] for p, _ in used], [y for _, y in used], data.classes, threshold=checks.shortcut_threshold,
        folds=checks.folds, seed=seed, pair_separation=checks.pair_separation,
        pair_min_images=checks.pair_min_images)}


def label_stats(data: DatasetSplits, rare_below: int) -> dict:
    """Multi-label data: images with no label and labels per image in each split, the labels with fewer than
    `rare_below` train images (too rare to learn and to score), and the train co-occurrence counts
    (`co_occurrence[i][j]`: train images with labels i and j; the diagonal: with label i)."""
    train = data.train
    hot = np.zeros((len(train), len(data.classes)), dtype=np.int64)
    for row, label in enumerate(train.labels):
        hot[row, list(label)] = 1
    per_split = {name: {"no_label": sum(not y for y in s.labels),
                        "labels_per_image": _spread([len(y) for y in s.labels])} for name, s in _splits(data).items()}
    counts = train.counts()
    return {"splits": per_split, "rare_below": rare_below,
            "rare": {c: n for c, n in counts.items() if n < rare_below}, "co_occurrence": (hot.T @ hot).tolist()}


def audit_dataset(data: DatasetSplits, *, name: str = "", root: Optional[str | Path] = None,
                  min_side: int = 0, checks: AuditConfig | None = None, seed: int = 0) -> dict:
    """The audit report (a JSON-ready dict) of loaded splits; see module docstring. `checks` (the `audit`
    config group) adds near-duplicates and shortcuts."""
    dups = find_duplicates(data)
    eval_paths = {p for n, s in _splits(data).items() if n != "train" for p in s.paths}
    leaked = leaked_eval_files(data)
    used = [p for s in _splits(data).values() for p in s.paths]
    mismatch = [{"path": p, "format": data.files[p].get("format")} for p in used
                if data.files.get(p, {}).get("ext_ok") is False]
    odd = [{"path": p, "mode": data.files[p].get("mode")} for p in used
           if data.files.get(p, {}).get("mode") not in (None, "RGB", "L")]
    few = [{"path": p, "colors": data.files[p]["colors"]} for p in used
           if data.files.get(p, {}).get("colors", FEW_COLORS + 1) <= FEW_COLORS]
    report = {"dataset": name, "root": str(root) if root else None, "classes": data.classes,
              "val_source": data.val_source,
              "splits": {n: split_stats(s, data.files, min_side) for n, s in _splits(data).items()},
              "unreadable": data.skipped, "extension_mismatch": mismatch, "odd_modes": odd, "few_colors": few,
              "stray_files": stray_files(root, data.kind), "duplicates": dups,
              "dedup": {"mode": "none", "dropped": []}, **(trust_checks(data, checks, seed) if checks else {})}
    if data.multilabel:
        report["multilabel"] = label_stats(data, checks.rare_label_images if checks else RARE_LABEL_IMAGES)
    report["summary"] = {
        "images": len(used), "unreadable": len(data.skipped), "extension_mismatch": len(mismatch),
        "odd_modes": len(odd), "few_colors": len(few), "stray_files": len(report["stray_files"]),
        "within_split_groups": len(dups["within_split"]),
        "within_split_extra_copies": sum(len(g["files"]) - 1 for g in dups["within_split"]),
        "cross_split_groups": len(dups["cross_split"]), "eval_files_leaked": len(leaked & eval_paths),
        "label_conflict_groups": len(dups["label_conflicts"])}
    if checks:
        pairs = report["near_duplicates"]["pairs"]
        report["summary"].update(near_duplicate_pairs=len(pairs),
                                 eval_files_near_leaked=len(near_duplicates.near_leaked_eval_files(pairs)))
    if "shortcuts" in report:
        report["summary"].update(shortcut_skill=report["shortcuts"]["classifier"].get("skill"),
                                 shortcut_flagged=report["shortcuts"]["flagged"],
                                 confound_pairs=report["shortcuts"]["pairs"]["class_pairs"])
    if data.multilabel:
        ml = report["multilabel"]
        report["summary"].update(rare_labels=len(ml["rare"]), train_images_without_label=ml["splits"]["train"][
            "no_label"])
    report["warnings"] = _warnings(report)
    return report


def leaked_eval_files(data: DatasetSplits) -> set[str]:
    """val files identical to a train file; test files identical to a train or val file."""
    seen: set[str] = set()
    leaked: set[str] = set()
    for name, split in _splits(data).items():
        hashes = [data.files.get(p, {}).get("sha1") for p in split.paths]
        if name != "train":
            leaked |= {p for p, h in zip(split.paths, hashes) if h and h in seen}
        seen |= {h for h in hashes if h}
    return leaked


def drop_eval_duplicates(data: DatasetSplits, report: dict, mode: str = "drop_from_eval") -> DatasetSplits:
    """`dataset.dedup=drop_from_eval`: remove leaked files from val/test (`drop_near_from_eval`: near-duplicates
    too); records them in `report`."""
    leaked = leaked_eval_files(data)
    if mode == "drop_near_from_eval":
        leaked |= near_duplicates.near_leaked_eval_files(report["near_duplicates"]["pairs"])

    def keep(split: Optional[Split]) -> Optional[Split]:
        if split is None:
            return None
        return split.take([i for i, p in enumerate(split.paths) if p not in leaked])

    report["dedup"] = {"mode": mode, "dropped": sorted(leaked)}
    report["warnings"] = _warnings(report)
    return dataclasses.replace(data, val=keep(data.val), test=keep(data.test))


def run_audit(data: DatasetSplits, *, name: str, root, dedup: str, checks: AuditConfig, seed: int,
              min_side: int = 0) -> tuple[DatasetSplits, dict]:
    """Audit, log the findings (leakage, shortcuts and confounds loudly) and apply `dataset.dedup`; returns the
    kept splits and the report (the caller writes it as audit.json, with what it adds)."""
    report = audit_dataset(data, name=name, root=root, min_side=min_side, checks=checks, seed=seed)
    s = report["summary"]
    near = dedup == "drop_near_from_eval" and s["eval_files_near_leaked"]
    if dedup != "none" and (s["eval_files_leaked"] or near):
        data = drop_eval_duplicates(data, report, dedup)
    for line in report["warnings"]:
        (_logger.error if line.startswith(LOUD_WARNINGS) else _logger.warning)(line)
    return data, report
