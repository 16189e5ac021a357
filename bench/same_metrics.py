"""Behaviour check for refactors: the same seeds must give the same metrics before and after.

    python bench/same_metrics.py OUT.json           # run the cases on this checkout, write their metrics
    python bench/same_metrics.py OUT.json --compare BEFORE.json   # ... and print the differences

The cases cover the fine-tune (digits and a folder dataset, hymenoptera), the boundary-cached fine-tune, a head
initialised from a probe, and the cached-feature probe with the label-issue audit. Epoch counts are fixed (no
time limit), so a run's metrics depend only on the code and the seed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = os.environ.get("DATASETS_DIR", str(ROOT.parent / "shared" / "datasets"))
CASES = {
    "digits_partial": ["dataset=digits", "strategy=partial", "trainer.epochs=2"],
    "digits_boundary_cache": ["dataset=digits", "strategy=partial", "trainer.epochs=2",
                              "trainer.boundary_cache=always"],
    "digits_head_from_probe": ["dataset=digits", "strategy=partial", "strategy.head_init=probe", "trainer.epochs=1"],
    "hymenoptera_partial": ["dataset=hymenoptera", "strategy=partial", "trainer.epochs=1"],
    "hymenoptera_cached_probe": ["dataset=hymenoptera", "strategy=linear_probe", "features.cached=true",
                                 "features.cache_dir=null", "audit.label_issues=true"],
}
KEYS = ("mode", "freeze_depth", "best_epoch", "val", "test", "skipped_files")
TIMINGS = ("seconds", "img_per_s")  # keys that measure time: they differ between any two runs


def run_case(name: str, overrides: list[str], out_root: Path) -> dict:
    run_dir = out_root / name
    cmd = [sys.executable, "-m", "pipeline.train", *overrides, "seed=42", f"output_dir={run_dir}",
           "trainer.progress=false"]
    env = {**os.environ, "DATASETS_DIR": DATASETS}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    audit = json.loads((run_dir / "audit.json").read_text())
    return {**{k: metrics.get(k) for k in KEYS}, "label_issues": audit.get("label_issues")}


def differences(before: dict, after: dict, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        return [d for k in sorted(set(before) | set(after)) if not str(k).endswith(TIMINGS)
                for d in differences(before.get(k), after.get(k), f"{path}.{k}" if path else k)]
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_case(name, overrides, Path(tmp)) for name, overrides in CASES.items()}
    args.out.write_text(json.dumps(results, indent=1))
    if args.compare:
        diffs = differences(json.loads(args.compare.read_text()), results)
        print("\n".join(diffs) if diffs else f"same metrics in all {len(results)} cases")
        sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
