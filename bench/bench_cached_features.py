"""Linear probe: naive frozen training (backbone every epoch) vs the cached-feature path, same head epochs.

    .venv/bin/python bench/bench_cached_features.py [--datasets hymenoptera flowers] [--epochs 20]
        [--seeds 42 1 2] [--backbone tf_efficientnet_lite0] [--extra key=value ...]

Both paths run the real pipeline (`train(cfg)` with strategy=linear_probe), once with
`features.cached=false` and once with `features.cached=true` and an empty cache dir (so the cached
time includes extracting the features), for every seed. One seed's val accuracy moves by about one
val-set standard error (flowers: 0.9 pt on 736 images), more than the 0.5 pt the target allows, so the
accuracies are compared as means over the seeds (the seed drives shuffling, augmentation and dropout).
Data: $DATASETS_DIR (default ../shared/datasets). Prints per-seed rows and a summary (mean wall seconds,
ratio, mean +- std val accuracy of both, verdict) and writes outputs/bench/bench_cached_features.json.
Target: ratio >= 10x at 20 epochs with mean val accuracy within 0.5 pt.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.config import register_configs  # noqa: E402
from pipeline.runtime.process import tune_allocator  # noqa: E402
from pipeline.train import train  # noqa: E402

TARGET_RATIO, TARGET_DIFF_PT = 10.0, 0.5

tune_allocator()  # as the entry points do (runtime/process.py): PyTorch runs 3-5x slower here without it


def run(dataset: str, cached: bool, epochs: int, seed: int, backbone: str, extra: list[str], work: Path) -> dict:
    tag = f"{'cached' if cached else 'naive'}_seed{seed}"
    overrides = [f"dataset={dataset}", f"backbone={backbone}", "strategy=linear_probe", f"trainer.epochs={epochs}",
                 f"seed={seed}", "trainer.progress=false", f"features.cached={str(cached).lower()}",
                 f"features.cache_dir={work / 'cache' / f'{dataset}_{seed}'}",  # empty: extraction is timed
                 f"output_dir={work / f'{dataset}_{tag}'}", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    start = time.perf_counter()
    metrics = train(cfg)
    return {"seconds": time.perf_counter() - start, "val_accuracy": metrics["val"]["accuracy"],
            "val_balanced_accuracy": metrics["val"]["balanced_accuracy"], "best_epoch": metrics["best_epoch"],
            "overrides": overrides}


def summarize(dataset: str, epochs: int, backbone: str, seeds: list[dict]) -> dict:
    def stats(path: str, key: str) -> tuple[float, float]:
        values = [r[path][key] for r in seeds]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    naive_s, cached_s = stats("naive", "seconds")[0], stats("cached", "seconds")[0]
    (naive_acc, naive_sd), (cached_acc, cached_sd) = stats("naive", "val_accuracy"), stats("cached", "val_accuracy")
    row = {"dataset": dataset, "epochs": epochs, "backbone": backbone, "seeds": seeds, "naive_seconds": naive_s,
           "cached_seconds": cached_s, "ratio": naive_s / cached_s, "naive_val_accuracy": naive_acc,
           "naive_val_accuracy_std": naive_sd, "cached_val_accuracy": cached_acc,
           "cached_val_accuracy_std": cached_sd, "accuracy_diff_pt": 100 * (cached_acc - naive_acc)}
    row["meets_target"] = row["ratio"] >= TARGET_RATIO and row["accuracy_diff_pt"] >= -TARGET_DIFF_PT
    return row


def print_tables(rows: list[dict]) -> None:
    print("| dataset | seed | naive s | cached s | naive val acc (best epoch) | cached val acc (best epoch) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for s in r["seeds"]:
            n, c = s["naive"], s["cached"]
            print(f"| {r['dataset']} | {s['seed']} | {n['seconds']:.0f} | {c['seconds']:.0f} | "
                  f"{n['val_accuracy']:.4f} ({n['best_epoch']}) | {c['val_accuracy']:.4f} ({c['best_epoch']}) |")
    print()
    print("| dataset | epochs | seeds | naive s | cached s | ratio | naive val acc | cached val acc | diff (pt) | "
          f"target (>= {TARGET_RATIO:.0f}x, >= -{TARGET_DIFF_PT} pt) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['epochs']} | {len(r['seeds'])} | {r['naive_seconds']:.0f} | "
              f"{r['cached_seconds']:.0f} | {r['ratio']:.1f}x | {r['naive_val_accuracy']:.4f} +- "
              f"{r['naive_val_accuracy_std']:.4f} | {r['cached_val_accuracy']:.4f} +- "
              f"{r['cached_val_accuracy_std']:.4f} "
              f"| {r['accuracy_diff_pt']:+.2f} | {'met' if r['meets_target'] else 'MISSED'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["hymenoptera", "flowers"])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both paths")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("DATASETS_DIR", str(ROOT.parent / "shared" / "datasets"))
    register_configs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cached_") as tmp:
        for name in args.datasets:
            seeds = []
            for seed in args.seeds:
                naive = run(name, False, args.epochs, seed, args.backbone, args.extra, Path(tmp))
                cached = run(name, True, args.epochs, seed, args.backbone, args.extra, Path(tmp))
                seeds.append({"seed": seed, "naive": naive, "cached": cached})
                print(f"[bench] {name} seed {seed}: naive {naive['seconds']:.0f} s acc {naive['val_accuracy']:.4f}"
                      f" | cached {cached['seconds']:.0f} s acc {cached['val_accuracy']:.4f}", flush=True)
            rows.append(summarize(name, args.epochs, args.backbone, seeds))
    result = {"rows": rows, "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    out = ROOT / "outputs" / "bench" / "bench_cached_features.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_tables(rows)
    print(f"load average at the end: {result['load_average']}; written {out}")


if __name__ == "__main__":
    main()
