"""Time-budget bench (issue 20): budgeted `auto` vs the best fixed mode given the same budget vs the 5-epoch default.

    .venv/bin/python bench/bench_budget.py [--datasets digits flowers chest_xray] [--budgets 1m 2m]
        [--seeds 42] [--configs auto partial finetune] [--input-size 160] [--extra key=value ...]
                                                                         (make bench-budget)

The default budgets, 1 and 2 minutes, bracket the 5-epoch default's time on these subsamples (about 15-80 s)
and keep the whole bench near 25 minutes on 2 CPU cores (each budgeted run spends most of its budget). Budgets
of 2, 5 and 10 minutes (`--budgets 2m 5m 10m`) take about 2.7 hours there.

Every run is the real pipeline (`train(cfg)`) on the fixed subsampled splits of bench/bench_recipes.py (CSV
manifests; scores on their test split). For each dataset and budget B:

    auto        strategy=auto trainer.time_limit=B (trainer.epochs=100: the budget decides)
    partial     strategy=partial trainer.time_limit=B (same cap)
    finetune    strategy=finetune trainer.time_limit=B
    probe       strategy=linear_probe (the cached probe: seconds; a budget does not change it)

and once per dataset the 5-epoch default: strategy=auto with trainer.epochs=5 and no limit (the default before
the 2-minute budget became it; `trainer.epochs` alone turns the limit off). The best fixed
mode at B is the best of partial, finetune and probe on test balanced accuracy. Wall time is that of the whole
`train(cfg)` call (the budget's clock starts inside it; the process start-up, ~7 s, is outside both).
Targets: every budgeted run ends within B + 5%; auto within 1 pt of the best fixed mode at each budget; auto not
below the default where B >= the default's wall time. Writes outputs/bench/bench_budget.json and .md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_recipes import dataset_root, subsample_rows, write_manifest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.config import register_configs  # noqa: E402
from pipeline.config.checks import parse_duration  # noqa: E402
from pipeline.runtime.process import tune_allocator  # noqa: E402

FIXED = {"partial": ["strategy=partial"], "finetune": ["strategy=finetune"], "probe": ["strategy=linear_probe"]}
BUDGETED = ("auto", "partial", "finetune")
OVER_LIMIT = 1.05  # a budgeted run may end at most 5% past its limit
EPOCH_CAP = 100

tune_allocator()  # as the entry points do (runtime/process.py): PyTorch runs 3-5x slower here without it


def run(dataset: str, manifest: Path, overrides: list[str], tag: str, seed: int, args, work: Path) -> dict:
    size = [] if dataset == "digits" else [f"dataset.input_size={args.input_size}"]
    all_overrides = [f"dataset={dataset}", f"dataset.manifest={manifest}", "dataset.cache=disk",
                     f"dataset.cache_dir={work / 'image_cache'}", f"features.cache_dir={work / 'features'}",
                     f"seed={seed}", "trainer.progress=false", "trainer.top_losses=0", "trainer.tensorboard=false",
                     f"output_dir={work / 'runs' / dataset / f'{tag}_seed{seed}'}", *size, *args.extra, *overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=all_overrides)
    from pipeline.train import train

    start = time.perf_counter()
    metrics = train(cfg)
    return {"seconds": time.perf_counter() - start, "balanced_accuracy": metrics["test"]["balanced_accuracy"],
            "mode": metrics.get("mode"), "epochs": len(metrics.get("history") or []),
            "planned_epochs": (metrics.get("budget") or {}).get("planned_epochs"),
            "freeze_depth": metrics.get("freeze_depth"), "overrides": overrides}


def verdict_rows(results: list[dict]) -> list[dict]:
    """Per dataset and budget: auto, the best fixed mode, the default, and the three targets."""
    def mean(rs: list[dict], key: str) -> float:
        return statistics.fmean(r[key] for r in rs)

    rows = []
    by = {}
    for r in results:
        by.setdefault((r["dataset"], r["budget_s"], r["config"]), []).append(r)
    for dataset, budget_s in sorted({(d, b) for d, b, _ in by if b is not None}):
        fixed = {c: mean(by[(dataset, b2, c)], "balanced_accuracy") for (d, b2, c) in by
                 if d == dataset and c in FIXED and b2 == budget_s}  # the probe at least (--configs auto)
        best_fixed = max(fixed, key=fixed.get)
        auto = by[(dataset, budget_s, "auto")]
        default = by[(dataset, None, "default")]
        budgeted = [r for (d, b2, c), rs in by.items() if d == dataset and b2 == budget_s and c in BUDGETED
                    for r in rs]
        row = {"dataset": dataset, "budget_s": budget_s, "auto": mean(auto, "balanced_accuracy"),
               "auto_seconds": mean(auto, "seconds"), "best_fixed": best_fixed, "best_fixed_score": fixed[best_fixed],
               "fixed": fixed, "default": mean(default, "balanced_accuracy"),
               "default_seconds": mean(default, "seconds"),
               "max_wall_over_budget": max(r["seconds"] / budget_s for r in budgeted)}
        row["within_limit"] = row["max_wall_over_budget"] <= OVER_LIMIT
        row["auto_within_1pt"] = row["auto"] >= row["best_fixed_score"] - 0.01
        row["auto_not_below_default"] = (row["auto"] >= row["default"] - 1e-9
                                         if budget_s >= row["default_seconds"] else None)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| dataset | budget | auto bal acc (s) | best fixed mode | partial / finetune / probe "
             "| 5-epoch default (s) "
             "| max wall / budget | targets |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["fixed"]
        fixed = " / ".join(f"{100 * f[c]:.1f}" if c in f else "-" for c in ("partial", "finetune", "probe"))
        targets = ", ".join([("in limit" if r["within_limit"] else "OVER LIMIT"),
                             ("auto within 1 pt" if r["auto_within_1pt"] else "auto MISSES 1 pt"),
                             {True: ">= default", False: "BELOW default", None: "budget < default's time"}[
                                 r["auto_not_below_default"]]])
        lines.append(f"| {r['dataset']} | {r['budget_s'] / 60:g} min | {100 * r['auto']:.1f} ({r['auto_seconds']:.0f})"
                     f" | {r['best_fixed']} {100 * r['best_fixed_score']:.1f} | {fixed} | {100 * r['default']:.1f} "
                     f"({r['default_seconds']:.0f}) | {r['max_wall_over_budget']:.2f} | {targets} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "flowers", "chest_xray"])
    ap.add_argument("--budgets", nargs="+", default=["1m", "2m"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[42])
    ap.add_argument("--configs", nargs="+", choices=BUDGETED, default=list(BUDGETED),
                    help="budgeted runs per budget (auto alone: how auto uses a longer budget)")
    ap.add_argument("--input-size", type=int, default=160)
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "budget"))
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench"), help="where bench_budget.json/.md go")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("DATASETS_DIR", str(ROOT.parent / "shared" / "datasets"))
    register_configs()
    work, results, start = Path(args.work), [], time.perf_counter()

    def record(dataset: str, manifest: Path, config: str, budget: str | None, overrides: list[str], seed: int):
        tag = f"{config}_{budget or 'epochs5'}"
        r = {"dataset": dataset, "config": config, "budget": budget, "seed": seed,
             "budget_s": parse_duration("--budgets", budget) if budget else None,
             **run(dataset, manifest, overrides, tag, seed, args, work)}
        results.append(r)
        print(f"[bench] {dataset:11s} {tag:18s} seed {seed}: bal acc {r['balanced_accuracy']:.4f}  "
              f"{r['seconds']:.0f} s  ({r['mode']}, {r['epochs']} epoch rows)  [{time.perf_counter() - start:.0f} s]",
              flush=True)

    for dataset in args.datasets:
        manifest = write_manifest(subsample_rows(dataset, dataset_root(dataset, work)),
                                  work / "manifests" / f"{dataset}.csv")
        for seed in args.seeds:
            record(dataset, manifest, "default", None, ["strategy=auto", "trainer.epochs=5"], seed)
            record(dataset, manifest, "probe", None, FIXED["probe"], seed)
            for budget in args.budgets:
                limit = [f"trainer.time_limit={budget}", f"trainer.epochs={EPOCH_CAP}"]
                for config in args.configs:
                    record(dataset, manifest, config, budget, (["strategy=auto"] if config == "auto"
                                                               else FIXED[config]) + limit, seed)
    # the probe ignores budgets: its one run counts as the probe at every budget
    rows = verdict_rows([dict(r, budget_s=b) for r in results
                         for b in ([r["budget_s"]] if r["config"] != "probe"
                                   else sorted({parse_duration("--budgets", x) for x in args.budgets}))])
    table = markdown(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"results": results, "rows": rows, "args": vars(args), "seconds": time.perf_counter() - start,
           "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    (out / "bench_budget.json").write_text(json.dumps(doc, indent=2, default=str))
    (out / "bench_budget.md").write_text(table + "\n")
    print(table)
    print(f"[bench] {len(results)} runs in {doc['seconds'] / 60:.1f} min; load average {doc['load_average']}")


if __name__ == "__main__":
    main()
