"""Recipe bench: today's defaults vs each technique alone vs the combined recipe, 3 seeds, 4 real datasets.

    .venv/bin/python bench/bench_recipes.py [--datasets digits hymenoptera flowers chest_xray] [--seeds 42 1 2]
        [--input-size 160] [--epochs 5] [--extra key=value ...]        (make bench-recipes)

Every run is the real pipeline (`train(cfg)`, strategy=auto, the default backbone) on a fixed, subsampled split
written as a CSV manifest (dataset.manifest), so that 4 datasets x 3 seeds x ~8 configurations fit well inside
90 minutes on 2 CPU cores:

    digits       sklearn's 8x8 digits as 64 px PNGs: per class 40 train / 30 val / 60 test
    hymenoptera  train/ + val/ pooled: per class 100 train / 40 val / the rest (~58) test
    flowers      train/ + val/ pooled: per class 60 train / 40 val / 60 test
    chest_xray   train/: 100 NORMAL + 290 PNEUMONIA train, 50 + 145 val (its 1:2.9 imbalance kept);
                 its own test/ split: 120 NORMAL + 200 PNEUMONIA test

Input size `--input-size` (160; digits keeps its 128), `trainer.epochs=--epochs` (5), decoded images cached on
disk once for all runs (dataset.cache=disk: the same pixels as the default memory cache). The seed drives
shuffling, augmentation, dropout and head init; the split is the same for every seed. Every run fits the
temperature (trainer.calibrate=true: it changes probabilities, never the predicted class), so each row shows ECE
before and after calibration. Scores are on the test split, which no run sees for any decision.

The baseline is today's defaults (before issue 17) pinned as overrides (BASELINE below), so the comparison does
not move when conf/ changes. Techniques (each alone on top of the baseline; a technique that does not act on the
path auto takes for a dataset,
e.g. EMA on the cached linear probe, is not run there and shows as n/a):
    converged_head  the cached linear head trains 30 epochs (cosine to zero; best val epoch kept), not 5
    logistic_head   the cached head is sklearn's logistic regression, C by stratified CV (features.head=logistic)
    probe_init      strategy.head_init=probe (LP-FT)
    ema             trainer.ema=true
    strong_aug      augment=strong (TrivialAugmentWide, random erasing, wide crop range)
    mixup           augment.mixup=0.2 augment.cutmix=1.0 (one of the two per batch)
    tta             trainer.tta=auto (flip kept only where it helps on val)

Rule for defaults (issue 17): a technique qualifies when its mean gain in test balanced accuracy exceeds the
seeds' std (the larger of the two configurations') on at least 2 datasets and it loses beyond that noise on
none. The `recipe` row combines every technique that qualified and is run last. Prints per-run lines, the
table (mean +- std balanced accuracy, ECE before -> after, mean seconds per run) and the verdicts; writes
outputs/bench/bench_recipes.json and outputs/bench/bench_recipes.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.config import register_configs  # noqa: E402
from pipeline.data.images import IMAGE_EXTENSIONS  # noqa: E402
from pipeline.runtime.process import tune_allocator  # noqa: E402

DATASETS = ("digits", "hymenoptera", "flowers", "chest_xray")
CACHED, FINETUNE, BOTH = "cached", "finetune", "both"
TECHNIQUES = {  # name: (overrides, the path it acts on)
    "converged_head": (["features.head_epochs=30"], CACHED),
    "logistic_head": (["features.head=logistic"], CACHED),
    "probe_init": (["strategy.head_init=probe"], FINETUNE),
    "ema": (["trainer.ema=true"], FINETUNE),
    "strong_aug": (["augment=strong"], FINETUNE),
    "mixup": (["augment.mixup=0.2", "augment.cutmix=1.0"], FINETUNE),
    "tta": (["trainer.tta=auto"], BOTH),
}
# Today's defaults (before issue 17), pinned so the baseline stays the same whatever conf/ says now.
BASELINE = ["augment=light", "features.head_epochs=5", "features.head_patience=0", "strategy.head_init=zero",
            "trainer.ema=false", "trainer.tta=off", "augment.mixup=0.0", "augment.cutmix=0.0"]
# Per class: (train, val, test); None = the rest of the pool. chest_xray: per class (train, val) from train/
# and test from its own test/ split.
SUBSAMPLE = {"digits": (40, 30, 60), "hymenoptera": (100, 40, None), "flowers": (60, 40, 60)}
CHEST = {"NORMAL": (100, 50, 120), "PNEUMONIA": (290, 145, 200)}

tune_allocator()  # as the entry points do (runtime/process.py): PyTorch runs 3-5x slower here without it


def class_files(folder: Path) -> dict[str, list[Path]]:
    """{class: sorted image files} of a folder of class folders."""
    return {c.name: sorted(p for p in c.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            for c in sorted(folder.iterdir()) if c.is_dir() and not c.name.startswith(".")}


def pooled(root: Path) -> dict[str, list[Path]]:
    """Class files of every split folder under `root` (train/, val/, ...), pooled per class."""
    pool: dict[str, list[Path]] = {}
    for split in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for c, files in class_files(split).items():
            pool.setdefault(c, []).extend(files)
    return pool


def subsample_rows(name: str, root: Path, seed: int = 0) -> list[tuple[str, str, str]]:
    """(path, label, split) rows of the bench's fixed subsample of dataset `name` (see the module docstring)."""
    rng, rows = random.Random(seed), []
    if name == "chest_xray":
        train, test = class_files(root / "train"), class_files(root / "test")
        for c, (n_train, n_val, n_test) in CHEST.items():
            files, held = rng.sample(train[c], len(train[c])), rng.sample(test[c], len(test[c]))
            rows += [(str(p), c, "train") for p in files[:n_train]]
            rows += [(str(p), c, "val") for p in files[n_train:n_train + n_val]]
            rows += [(str(p), c, "test") for p in held[:n_test]]
        return rows
    n_train, n_val, n_test = SUBSAMPLE[name]
    for c, files in pooled(root).items():
        files = rng.sample(files, len(files))
        rest = files[n_train + n_val:]
        rows += [(str(p), c, "train") for p in files[:n_train]]
        rows += [(str(p), c, "val") for p in files[n_train:n_train + n_val]]
        rows += [(str(p), c, "test") for p in (rest if n_test is None else rest[:n_test])]
    return rows


def merged(base: list[str], overrides: list[str]) -> list[str]:
    """`base` with each key that `overrides` sets replaced (Hydra rejects a key given twice)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in base if o.split("=", 1)[0] not in keys] + overrides


def write_manifest(rows: list[tuple[str, str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def dataset_root(name: str, work: Path) -> Path:
    if name == "digits":
        from pipeline.data.sources import write_digits_imagefolder
        return write_digits_imagefolder(ROOT / "data" / "digits", image_size=64)
    return Path(os.environ["DATASETS_DIR"]) / name


def run(dataset: str, manifest: Path, config: str, overrides: list[str], seed: int, args, work: Path) -> dict:
    size = [] if dataset == "digits" else [f"dataset.input_size={args.input_size}"]
    all_overrides = [f"dataset={dataset}", f"dataset.manifest={manifest}", "dataset.cache=disk",
                     f"dataset.cache_dir={work / 'image_cache'}", f"features.cache_dir={work / 'features'}",
                     f"trainer.epochs={args.epochs}", f"seed={seed}", "trainer.progress=false",
                     "trainer.calibrate=true", "trainer.top_losses=0", "trainer.tensorboard=false",
                     f"output_dir={work / 'runs' / dataset / f'{config}_seed{seed}'}", *size, *args.extra,
                     *merged(BASELINE, overrides)]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=all_overrides)
    from pipeline.train import train

    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    cal = metrics.get("calibration") or {}
    test_cal = cal.get("test") or {}
    return {"config": config, "seed": seed, "seconds": seconds, "mode": metrics.get("mode"),
            "path": CACHED if (metrics.get("features") or {}).get("cached") else FINETUNE,
            "balanced_accuracy": metrics["test"]["balanced_accuracy"], "accuracy": metrics["test"]["accuracy"],
            "ece_before": (test_cal.get("before") or {}).get("ece"),
            "ece_after": (test_cal.get("after") or {}).get("ece"),
            "tta": (cal.get("tta") or {}).get("views"), "best_epoch": metrics.get("best_epoch"),
            "overrides": overrides}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    """{dataset: {config: {bal, bal_std, ece_before, ece_after, seconds, n, path}}} from the run records."""
    table: dict = {}
    for r in runs:
        table.setdefault(r["dataset"], {}).setdefault(r["config"], []).append(r)
    out: dict = {}
    for dataset, configs in table.items():
        for config, rs in configs.items():
            bal, bal_std = mean_std([r["balanced_accuracy"] for r in rs])
            eces = [r["ece_before"] for r in rs if r["ece_before"] is not None]
            cals = [r["ece_after"] for r in rs if r["ece_after"] is not None]
            out.setdefault(dataset, {})[config] = {
                "balanced_accuracy": bal, "balanced_accuracy_std": bal_std, "n": len(rs), "path": rs[0]["path"],
                "ece_before": statistics.fmean(eces) if eces else None,
                "ece_after": statistics.fmean(cals) if cals else None,
                "seconds": statistics.fmean(r["seconds"] for r in rs)}
    return out


def verdicts(summary: dict, techniques=TECHNIQUES) -> dict:
    """{technique: {gains: {dataset: (gain pt, noise pt)}, wins, losses, qualifies}} by the rule in the docstring."""
    result = {}
    for name in techniques:
        gains = {}
        for dataset, configs in summary.items():
            if name in configs and "default" in configs:
                t, d = configs[name], configs["default"]
                noise = max(t["balanced_accuracy_std"], d["balanced_accuracy_std"])
                gains[dataset] = (100 * (t["balanced_accuracy"] - d["balanced_accuracy"]), 100 * noise)
        wins = [d for d, (g, n) in gains.items() if g > n]
        losses = [d for d, (g, n) in gains.items() if g < -n]
        result[name] = {"gains": gains, "wins": wins, "losses": losses,
                        "qualifies": len(wins) >= 2 and not losses}
    return result


def applies(technique: str, path: str) -> bool:
    return TECHNIQUES[technique][1] in (BOTH, path)


def recipe_overrides(chosen: list[str]) -> list[str]:
    return [o for name in chosen for o in TECHNIQUES[name][0]]


def markdown(summary: dict, verdict: dict, configs: list[str]) -> str:
    datasets = list(summary)
    head = "| configuration | " + " | ".join(datasets) + " |"
    lines = [head, "|---" * (len(datasets) + 1) + "|"]
    for config in configs:
        cells = []
        for d in datasets:
            s = summary[d].get(config)
            if s is None:
                cells.append("n/a")
                continue
            ece = (f"; ECE {s['ece_before']:.3f} -> {s['ece_after']:.3f}" if s["ece_before"] is not None
                   and s["ece_after"] is not None else "")
            cells.append(f"{100 * s['balanced_accuracy']:.1f} +- {100 * s['balanced_accuracy_std']:.1f}{ece}; "
                         f"{s['seconds']:.0f} s")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    lines += ["", "| technique | gain in pt (noise) per dataset | qualifies |", "|---|---|---|"]
    for name, v in verdict.items():
        gains = ", ".join(f"{d} {g:+.1f} ({n:.1f})" for d, (g, n) in v["gains"].items()) or "not applicable"
        lines.append(f"| {name} | {gains} | {'yes' if v['qualifies'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    ap.add_argument("--input-size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--techniques", nargs="*", default=list(TECHNIQUES), choices=list(TECHNIQUES))
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "recipes"))
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("DATASETS_DIR", str(ROOT.parent / "shared" / "datasets"))
    register_configs()
    work, runs, start = Path(args.work), [], time.perf_counter()
    manifests = {d: write_manifest(subsample_rows(d, dataset_root(d, work)), work / "manifests" / f"{d}.csv")
                 for d in args.datasets}

    def record(dataset: str, config: str, overrides: list[str], seed: int) -> dict:
        r = {"dataset": dataset, **run(dataset, manifests[dataset], config, overrides, seed, args, work)}
        runs.append(r)
        print(f"[bench] {dataset:12s} {config:15s} seed {seed:3d}: bal acc {r['balanced_accuracy']:.4f}  ECE "
              f"{r['ece_before'] or float('nan'):.3f} -> {r['ece_after'] or float('nan'):.3f}  {r['seconds']:.0f} s "
              f"({r['mode']}, {r['path']})  [{time.perf_counter() - start:.0f} s total]", flush=True)
        return r

    paths = {}
    for dataset in args.datasets:
        paths[dataset] = [record(dataset, "default", [], seed) for seed in args.seeds][0]["path"]
        for name in args.techniques:
            if applies(name, paths[dataset]):
                for seed in args.seeds:
                    record(dataset, name, TECHNIQUES[name][0], seed)
    verdict = verdicts(summarize(runs), {n: TECHNIQUES[n] for n in args.techniques})
    chosen = [n for n, v in verdict.items() if v["qualifies"]]
    print(f"[bench] qualified for the recipe: {chosen or 'none'}", flush=True)
    if chosen:
        for dataset in args.datasets:
            acting = [n for n in chosen if applies(n, paths[dataset])]
            if acting:
                for seed in args.seeds:
                    record(dataset, "recipe", recipe_overrides(acting), seed)
    summary = summarize(runs)
    table = markdown(summary, verdict, ["default", *args.techniques, *(["recipe"] if chosen else [])])
    result = {"runs": runs, "summary": summary, "verdicts": verdict, "recipe": chosen, "args": vars(args),
              "seconds": time.perf_counter() - start, "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    out = ROOT / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_recipes.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench_recipes.md").write_text(table + "\n")
    print(table)
    print(f"[bench] {len(runs)} runs in {result['seconds'] / 60:.1f} min; load average at the end "
          f"{result['load_average']}; written {out / 'bench_recipes.json'} and bench_recipes.md")


if __name__ == "__main__":
    main()
