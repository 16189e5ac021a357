"""Linear probe: naive frozen training (backbone every epoch) vs the cached-feature path, same head epochs.

    .venv/bin/python bench/bench_cached_features.py [--datasets hymenoptera flowers] [--epochs 20]
        [--backbone tf_efficientnet_lite0] [--extra key=value ...]

Both paths run the real pipeline (`train(cfg)` with strategy=linear_probe), once with
`features.cached=false` and once with `features.cached=true` and an empty cache dir (so the cached
time includes extracting the features). Data: $DATASETS_DIR (default ../shared/datasets). Prints a
table (wall seconds, ratio, val accuracy of both) and writes outputs/bench/bench_cached_features.json.
Target: ratio >= 10x at 20 epochs with val accuracy within 0.5 pt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (allocator tuning before torch)
from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.config import register_configs  # noqa: E402
from pipeline.train import train  # noqa: E402


def run(dataset: str, cached: bool, epochs: int, backbone: str, extra: list[str], work: Path) -> dict:
    tag = "cached" if cached else "naive"
    overrides = [f"dataset={dataset}", f"backbone={backbone}", "strategy=linear_probe", f"trainer.epochs={epochs}",
                 "trainer.progress=false", f"features.cached={str(cached).lower()}",
                 f"features.cache_dir={work / 'cache' / dataset}", f"output_dir={work / f'{dataset}_{tag}'}",
                 *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    start = time.perf_counter()
    metrics = train(cfg)
    return {"seconds": time.perf_counter() - start, "val_accuracy": metrics["val"]["accuracy"],
            "val_balanced_accuracy": metrics["val"]["balanced_accuracy"], "best_epoch": metrics["best_epoch"],
            "overrides": overrides}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["hymenoptera", "flowers"])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both paths")
    args = ap.parse_args()
    os.environ.setdefault("DATASETS_DIR", str(ROOT.parent / "shared" / "datasets"))
    register_configs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cached_") as tmp:
        for name in args.datasets:
            naive = run(name, False, args.epochs, args.backbone, args.extra, Path(tmp))
            cached = run(name, True, args.epochs, args.backbone, args.extra, Path(tmp))
            rows.append({"dataset": name, "epochs": args.epochs, "backbone": args.backbone, "naive": naive,
                         "cached": cached, "ratio": naive["seconds"] / cached["seconds"],
                         "accuracy_diff_pt": 100 * (cached["val_accuracy"] - naive["val_accuracy"])})
    result = {"rows": rows, "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    out = ROOT / "outputs" / "bench" / "bench_cached_features.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("| dataset | epochs | naive s | cached s | ratio | naive val acc | cached val acc | diff (pt) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['epochs']} | {r['naive']['seconds']:.0f} | {r['cached']['seconds']:.0f} | "
              f"{r['ratio']:.1f}x | {r['naive']['val_accuracy']:.4f} | {r['cached']['val_accuracy']:.4f} | "
              f"{r['accuracy_diff_pt']:+.2f} |")
    print(f"load average at the end: {result['load_average']}; written {out}")


if __name__ == "__main__":
    main()
