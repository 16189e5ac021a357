"""Leak-free evaluation: the val/test files that copy an earlier split's file are set aside.

The audit (data/data_audit.py) finds val/test files byte-identical to a train file (or, for test, a val file)
and, with the audit's near-duplicate check, files within a few bits of perceptual hash of one (resized or
re-encoded copies). A model scored on its own training images scores high, so by default those files leave
the val and test splits the run selects, calibrates and reports on, and wait in `DatasetSplits.leaked`: the
final evaluation scores them too, and reports the full numbers beside the leak-free headline
(training/final_eval.py). `dataset.dedup=drop_from_eval` / `drop_near_from_eval` drop them instead.
"""
from __future__ import annotations

import dataclasses
import logging

from pipeline.data import near_duplicates
from pipeline.data.data_audit import leaked_eval_files
from pipeline.data.folder import DatasetSplits, Split

_logger = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")


def leaked_files(data: DatasetSplits, report: dict) -> dict[str, set[str]]:
    """{"exact": paths, "near": paths} of the val/test files that copy a file of an earlier split; `report`: the
    audit's (its near-duplicate pairs, where the audit looked for them)."""
    exact = leaked_eval_files(data)
    near = near_duplicates.near_leaked_eval_files((report.get("near_duplicates") or {}).get("pairs", [])) - exact
    return {"exact": exact, "near": near}


def _partition(split: Split, leaked: set[str]) -> tuple[Split, Split]:
    return (split.take([i for i, p in enumerate(split.paths) if p not in leaked]),
            split.take([i for i, p in enumerate(split.paths) if p in leaked]))


def set_aside(data: DatasetSplits, report: dict) -> tuple[DatasetSplits, dict]:
    """The splits with their leaked val/test files moved to `leaked`, and the record of it (metrics.json `leaks`).
    A split whose every file leaked keeps them all (nothing would be left to select or score on), and says so."""
    found = leaked_files(data, report)
    every = found["exact"] | found["near"]
    record: dict = {"exact": 0, "near": 0}
    kept, leaked = {}, {}
    for name in EVAL_SPLITS:
        split = getattr(data, name)
        if split is None or not (every & set(split.paths)):
            continue
        clean, copies = _partition(split, every)
        if not len(clean):
            _logger.warning("Every %s file copies a file of an earlier split: the %s metrics count them (no leak-free "
                            "subset is left)", name, name)
            record[name] = {"leaked": len(copies), "leak_free": 0, "set_aside": False}
            continue
        kept[name], leaked[name] = clean, copies
        record[name] = {"leaked": len(copies), "leak_free": len(clean), "set_aside": True}
        record["exact"] += len(found["exact"] & set(copies.paths))
        record["near"] += len(found["near"] & set(copies.paths))
    if not leaked:
        return data, record if any(name in record for name in EVAL_SPLITS) else {}
    _logger.warning("Leak-free evaluation: %s set aside (copies of a train or val file); val selects the epoch on "
                    "the rest, and the full numbers are reported beside the leak-free ones",
                    ", ".join(f"{len(s)} {n}" for n, s in leaked.items()))
    return dataclasses.replace(data, **kept, leaked=leaked), record
