"""Time-budget bench on full-size data (issue 31): budgeted `auto` vs the probe vs each fixed mode, 3 seeds.

    .venv/bin/python bench/bench_budget.py [--datasets digits flowers ...] [--budgets 2m 5m 10m]
        [--seeds 42 43 44] [--configs auto partial finetune] [--with-default] [--smoke]
        [--input-size N] [--extra key=value ...] [--work DIR] [--out DIR]          (make bench-budget ARGS="...")

Datasets (default): `digits` (embedded, generated from sklearn) and every dataset folder under DATASETS_DIR
(env; default ../shared/datasets beside the repo, i.e. /work/shared/datasets): a subfolder whose `train/` holds
class folders (today chest_xray, flowers, hymenoptera). A name with a conf/dataset/<name>.yaml runs as
`dataset=<name> dataset.root=<folder>`, any other as `dataset=folder dataset.root=<folder>`; `--datasets` also
takes a path to such a folder. Every run is the real pipeline (`train(cfg)`) on the FULL dataset: no manifest,
no subsampling, the dataset's own splits (train/ val/ test/ folders where present, otherwise the config's
dataset.val_fraction / test_fraction). Images at the dataset's / backbone's own input size (`--input-size N`
sets dataset.input_size; digits keeps its 128). Decoded images are cached on disk once for all runs
(dataset.cache=disk, <work>/image_cache) and the probe's features in <work>/features.

Per dataset and seed:
    probe       strategy=linear_probe, once per seed (the cached probe: a budget does not change it)
    default     strategy=auto trainer.epochs=5, no limit (the 5-epoch default; only with --with-default,
                off by default: it takes long on full data)
and per budget B (--budgets, default 2m 5m 10m; --configs picks which of the three run):
    auto        strategy=auto trainer.time_limit=B (trainer.epochs=100: the budget decides)
    partial     strategy=partial trainer.time_limit=B (same cap)
    finetune    strategy=finetune trainer.time_limit=B

Table (outputs/bench/bench_budget.md; one row per dataset and budget): `split` is the split scored: test
balanced accuracy, or val where the dataset has no test split (digits, flowers and hymenoptera today: their val
also picks the best epoch, so it reads optimistic; `--extra dataset.test_fraction=0.2` draws a test split from
train where none is given). `auto`, `probe`, `partial`, `finetune` (and `default`) are that score in points,
mean +- sample standard deviation over the seeds (a lone seed shows the mean alone), with the mean wall seconds
of the whole `train(cfg)` call (the budget's clock starts inside it; process start-up is outside both).
`max wall / budget` is the longest budgeted run at that budget over B. Targets, on means over the seeds:
    (a) auto at a budget >= auto at the dataset's next shorter budget (5 min >= 2 min, 10 >= 5)
    (b) auto >= probe - 0.5 point, at every budget
    (c) auto >= the best fixed mode (partial, finetune; those that ran) - 1 point, at every budget
    (d) every budgeted run (auto, partial, finetune) ends within B + 5% (OVER_LIMIT)
A target that cannot be judged (the first budget for (a), no fixed mode run for (c)) shows as "-" and is not
counted. The last line says how many targets hold of how many judged. Writes outputs/bench/bench_budget.json
(every run, incl. auto's `decision["budget"]` record as `auto_budget`, and the rows) and bench_budget.md.

Resumable: each run has its own output_dir, <work>/runs/full/<dataset>/<config>_<budget>_seed<seed> (runs/smoke/
with --smoke). A dir that already holds a finished run (metrics.json with status ok) is not re-run: its
metrics.json is reused, with the bench's wall time from the `<dir>.bench.json` note written beside it (else the
run's own train_seconds). So after an interruption, the same command goes on where it stopped. A reused run
whose note shows other overrides (another --extra, --input-size, ...) stops the bench: use another --work. A
dir left by an interrupted or failed run is moved aside to `<dir>.incomplete-N` and the run starts afresh.

Time on 2 CPU cores (each budgeted run spends about its budget; not measured end to end here): the default
pass is datasets x budgets x seeds x budgeted configs x budget = 4 datasets x (2+5+10 min) x 3 seeds x 3
configs = 612 min ~ 10.2 h, plus the 12 probe runs (feature extraction over each full dataset: minutes each,
not measured) and each run's start-up (listing and auditing the full dataset). A shorter pass:
`--configs auto --budgets 2m 5m` = 4 x (2+5) x 3 x 1 = 84 min ~ 1.4 h plus the probes (judges (a), (b), (d);
(c) needs the fixed modes). The bench prints its own estimate for the arguments given before it starts.

`--smoke`: the old fast subsample mode, to check the wiring: the fixed subsampled splits of
bench/bench_recipes.py (subsample_rows / write_manifest, CSV manifests; digits, hymenoptera, flowers,
chest_xray only), input size 160, budgets 1m and seed 42 unless --budgets / --seeds say otherwise.
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

from bench_recipes import SUBSAMPLE, dataset_root, subsample_rows, write_manifest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.config import register_configs  # noqa: E402
from pipeline.config.checks import parse_duration  # noqa: E402
from pipeline.runtime import run_lock  # noqa: E402
from pipeline.runtime.process import tune_allocator  # noqa: E402

FIXED = {"partial": ["strategy=partial"], "finetune": ["strategy=finetune"]}
PROBE = ["strategy=linear_probe"]
DEFAULT = ["strategy=auto", "trainer.epochs=5"]
BUDGETED = ("auto", "partial", "finetune")
OVER_LIMIT = 1.05  # (d) a budgeted run may end at most 5% past its limit
PROBE_SLACK = 0.005  # (b) auto may trail the probe by at most 0.5 point
FIXED_SLACK = 0.01  # (c) auto may trail the best fixed mode by at most 1 point
EPS = 1e-9  # float noise in the comparisons
EPOCH_CAP = 100
SMOKE_DATASETS = tuple(dict.fromkeys(["digits", *SUBSAMPLE, "chest_xray"]))  # what subsample_rows knows
NOT_DATASET_CONFIGS = ("folder", "digits")  # conf/dataset yamls that are no named folder dataset
TARGETS = {"a": "more budget not worse", "b": "auto >= probe - 0.5 pt", "c": "auto >= best fixed - 1 pt",
           "d": "within budget + 5%"}

tune_allocator()  # as the entry points do (runtime/process.py): PyTorch runs 3-5x slower here without it


# ---- datasets ----------------------------------------------------------------------------------------------

def datasets_dir() -> Path:
    return Path(os.environ.get("DATASETS_DIR") or ROOT.parent / "shared" / "datasets")


def has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(c.is_dir() and not c.name.startswith(".") for c in folder.iterdir())


def dataset_spec(key: str, root: Path | None) -> dict:
    """{"key", "root", "overrides"}: how the runs of one dataset name it (root None: the embedded digits)."""
    if root is None:
        return {"key": key, "root": None, "overrides": ["dataset=digits"]}
    known = (ROOT / "conf" / "dataset" / f"{root.name}.yaml").is_file() and not root.name.startswith("_") \
        and root.name not in NOT_DATASET_CONFIGS
    return {"key": key, "root": str(root),
            "overrides": [f"dataset={root.name}" if known else "dataset=folder", f"dataset.root={root}"]}


def discover(base: Path) -> list[dict]:
    """A spec per dataset folder under `base`: a subfolder whose train/ holds class folders (sorted by name)."""
    if not base.is_dir():
        return []
    found = []
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if has_class_folders(d / "train"):
            found.append(dataset_spec("digits_folder" if d.name == "digits" else d.name, d))
    return found


def select_datasets(names: list[str] | None, base: Path) -> list[dict]:
    """digits + every folder under `base` when `names` is None; else each name (digits, a discovered folder's
    name, or a path to a folder with train/<class>/)."""
    found = {s["key"]: s for s in discover(base)}
    if names is None:
        return [dataset_spec("digits", None), *found.values()]
    specs = []
    for name in names:
        if name == "digits":
            specs.append(dataset_spec("digits", None))
        elif name in found:
            specs.append(found[name])
        elif has_class_folders(Path(name) / "train"):
            path = Path(name).resolve()
            specs.append(dataset_spec(path.name, path))
        else:
            raise SystemExit(f"--datasets {name}: not digits, not a dataset folder under {base} "
                             f"({', '.join(found) or 'none found'}), and not a path to a folder with train/<class>/")
    return specs


# ---- one run -----------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def finished_metrics(run_dir: Path) -> dict | None:
    """The metrics.json of a finished run in `run_dir` (status ok, a val or test score), or None."""
    metrics = read_json(run_dir / "metrics.json")
    if not metrics or metrics.get("status") != "ok":
        return None
    return metrics if score_of(metrics) is not None else None


def score_of(metrics: dict) -> tuple[str, float] | None:
    """("test", balanced accuracy), or ("val", ...) where the run had no test split."""
    for split in ("test", "val"):
        value = (metrics.get(split) or {}).get("balanced_accuracy") if isinstance(metrics.get(split), dict) else None
        if isinstance(value, (int, float)):
            return split, float(value)
    return None


def set_aside(run_dir: Path) -> Path | None:
    """Move a dir that an interrupted or failed run left to `<dir>.incomplete-N` (a fresh run refuses it)."""
    if not run_dir.exists():
        return None
    pid = run_lock.live_pid(run_dir)
    if pid is not None:
        raise SystemExit(f"{run_dir} is in use by a live run (pid {pid}): another bench on the same --work? "
                         "Wait for it, or use another --work")
    n = 1
    while run_dir.with_name(f"{run_dir.name}.incomplete-{n}").exists():
        n += 1
    aside = run_dir.with_name(f"{run_dir.name}.incomplete-{n}")
    run_dir.rename(aside)
    print(f"[bench] {run_dir} holds no finished run: moved aside to {aside.name}", flush=True)
    return aside


def execute(overrides: list[str]) -> tuple[dict, float]:
    """Compose the config and train: (metrics, wall seconds of `train(cfg)`)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    from pipeline.train import train

    start = time.perf_counter()
    metrics = train(cfg)
    return metrics, time.perf_counter() - start


def run(spec: dict, overrides: list[str], tag: str, seed: int, args, work: Path) -> dict:
    """One run (or the reuse of its finished dir): its score, seconds and what the plan did."""
    run_dir = work / "runs" / ("smoke" if args.smoke else "full") / spec["key"] / f"{tag}_seed{seed}"
    note = run_dir.with_name(run_dir.name + ".bench.json")
    size = [f"dataset.input_size={args.input_size}"] if args.input_size and spec["root"] is not None else []
    manifest = [f"dataset.manifest={spec['manifest']}"] if spec.get("manifest") else []
    all_overrides = [*spec["overrides"], *manifest, "dataset.cache=disk", f"dataset.cache_dir={work / 'image_cache'}",
                     f"features.cache_dir={work / 'features'}", f"seed={seed}", "trainer.progress=false",
                     "trainer.top_losses=0", "trainer.tensorboard=false", f"output_dir={run_dir}", *size,
                     *args.extra, *overrides]
    metrics = finished_metrics(run_dir)
    if metrics is not None:
        noted = read_json(note) or {}
        if noted.get("overrides") not in (None, all_overrides):
            raise SystemExit(f"{run_dir} holds a finished run with other overrides ({noted['overrides']}) than "
                             f"this bench asks ({all_overrides}): use another --work, or remove that dir")
        seconds = noted.get("seconds", metrics.get("train_seconds"))
        reused = True
    else:
        set_aside(run_dir)
        metrics, seconds = execute(all_overrides)
        note.write_text(json.dumps({"overrides": all_overrides, "seconds": seconds}, indent=2))
        reused = False
    split, score = score_of(metrics)
    decision = metrics.get("decision") if isinstance(metrics.get("decision"), dict) else {}
    return {"seconds": seconds, "train_seconds": metrics.get("train_seconds"), "balanced_accuracy": score,
            "split": split, "mode": metrics.get("mode"), "epochs": len(metrics.get("history") or []),
            "planned_epochs": (metrics.get("budget") or {}).get("planned_epochs"),
            "freeze_depth": metrics.get("freeze_depth"), "decision_mode": decision.get("mode"),
            "auto_budget": decision.get("budget"), "reused": reused, "run_dir": str(run_dir), "overrides": overrides}


# ---- verdict -----------------------------------------------------------------------------------------------

def stats(rs: list[dict]) -> dict:
    scores = [r["balanced_accuracy"] for r in rs]
    return {"mean": statistics.fmean(scores), "sd": statistics.stdev(scores) if len(scores) > 1 else None,
            "n": len(scores), "seconds": statistics.fmean(r["seconds"] for r in rs)}


def verdict_rows(results: list[dict]) -> list[dict]:
    """Per dataset and budget: each configuration's mean +- sd over the seeds and the targets (a)-(d)."""
    by: dict[tuple, list[dict]] = {}
    for r in results:
        by.setdefault((r["dataset"], r["budget_s"], r["config"]), []).append(r)
    rows, previous_auto = [], {}
    for dataset, budget_s in sorted({(d, b) for d, b, c in by if b is not None and c in BUDGETED}):
        scores = {c: stats(by[(dataset, budget_s, c)]) for c in BUDGETED if (dataset, budget_s, c) in by}
        for c in ("probe", "default"):  # run without a budget: the same at every budget
            if (dataset, None, c) in by:
                scores[c] = stats(by[(dataset, None, c)])
        budgeted = [r for c in BUDGETED for r in by.get((dataset, budget_s, c), [])]
        fixed = {c: scores[c]["mean"] for c in FIXED if c in scores}
        best_fixed = max(fixed, key=fixed.get) if fixed else None
        splits = {r["split"] for rs in (by.get((dataset, budget_s, c), []) for c in (*BUDGETED, "probe")) for r in rs}
        auto = scores["auto"]["mean"] if "auto" in scores else None
        shorter = previous_auto.get(dataset)
        targets = {
            "a": None if auto is None or shorter is None else auto >= shorter[1] - EPS,
            "b": None if auto is None or "probe" not in scores else auto >= scores["probe"]["mean"] - PROBE_SLACK - EPS,
            "c": None if auto is None or best_fixed is None else auto >= fixed[best_fixed] - FIXED_SLACK - EPS,
            "d": max(r["seconds"] / budget_s for r in budgeted) <= OVER_LIMIT,
        }
        rows.append({"dataset": dataset, "budget_s": budget_s, "split": "test" if splits == {"test"} else "val",
                     "scores": scores, "best_fixed": best_fixed,
                     "best_fixed_score": fixed[best_fixed] if best_fixed else None,
                     "shorter_budget_s": shorter[0] if shorter else None,
                     "max_wall_over_budget": max(r["seconds"] / budget_s for r in budgeted), "targets": targets})
        if auto is not None:
            previous_auto[dataset] = (budget_s, auto)
    return rows


def target_counts(rows: list[dict]) -> dict:
    """{"held", "judged", per target letter: [held, judged]}: targets that could not be judged are not counted."""
    per = {t: [0, 0] for t in TARGETS}
    for row in rows:
        for t, ok in row["targets"].items():
            if ok is not None:
                per[t][0] += bool(ok)
                per[t][1] += 1
    return {"held": sum(h for h, _ in per.values()), "judged": sum(j for _, j in per.values()), **per}


# ---- table -------------------------------------------------------------------------------------------------

def fmt_score(s: dict | None, seconds: bool = True) -> str:
    """Points, mean +- sample sd over the seeds (the mean alone for one seed), and the mean seconds."""
    if s is None:
        return "-"
    text = f"{100 * s['mean']:.1f}" + (f" ± {100 * s['sd']:.1f}" if s["sd"] is not None else "")
    return text + (f" ({s['seconds']:.0f} s)" if seconds else "")


def fmt_budget(budget_s: float) -> str:
    return f"{budget_s / 60:g} min" if budget_s >= 60 else f"{budget_s:g} s"


def targets_text(row: dict) -> str:
    words = {True: "ok", False: "MISS", None: "-"}
    return ", ".join(f"({t}) {words[ok]}" for t, ok in row["targets"].items())


def markdown(rows: list[dict], with_default: bool = False) -> str:
    configs = ["auto", "probe", "partial", "finetune"] + (["default"] if with_default else [])
    names = {"default": "5-epoch default"}
    lines = ["| dataset | split | budget | " + " | ".join(names.get(c, c) for c in configs)
             + " | max wall / budget | targets |", "|---" * (len(configs) + 5) + "|"]
    for r in rows:
        split = "test" if r["split"] == "test" else "val (no test split)"
        cells = [fmt_score(r["scores"].get(c)) for c in configs]
        lines.append(f"| {r['dataset']} | {split} | {fmt_budget(r['budget_s'])} | " + " | ".join(cells)
                     + f" | {r['max_wall_over_budget']:.2f} | {targets_text(r)} |")
    return "\n".join(lines)


def summary_line(counts: dict) -> str:
    per = ", ".join(f"({t}) {TARGETS[t]} {counts[t][0]}/{counts[t][1]}" for t in TARGETS)
    return f"[bench] targets: {counts['held']} of {counts['judged']} hold ({per})"


def legend() -> str:
    return ("Balanced accuracy in points, mean ± sample sd over the seeds, (mean wall seconds of train(cfg)). "
            "Targets on the means: (a) auto >= auto at the next shorter budget; (b) auto >= probe - 0.5 pt; "
            "(c) auto >= best of partial/finetune - 1 pt; (d) every budgeted run within budget + 5%. "
            "-: not judged.")


# ---- main --------------------------------------------------------------------------------------------------

def estimate_minutes(n_datasets: int, budgets_s: list[float], n_seeds: int, n_configs: int) -> float:
    """Budgeted runs alone: each spends about its budget."""
    return n_datasets * sum(budgets_s) / 60 * n_seeds * n_configs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=None,
                    help="default: digits + every folder with train/<class>/ under DATASETS_DIR")
    ap.add_argument("--budgets", nargs="+", default=None, help="default 2m 5m 10m (--smoke: 1m)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default 42 43 44 (--smoke: 42)")
    ap.add_argument("--configs", nargs="+", choices=BUDGETED, default=list(BUDGETED),
                    help="budgeted runs per budget (auto alone: a shorter pass; target (c) is then not judged)")
    ap.add_argument("--with-default", action="store_true", help="also the 5-epoch default, once per seed (long)")
    ap.add_argument("--smoke", action="store_true", help="the fast subsample mode (bench_recipes' splits)")
    ap.add_argument("--input-size", type=int, default=None,
                    help="dataset.input_size for the folder datasets (default: their own; --smoke: 160)")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "budget"))
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench"), help="where bench_budget.json/.md go")
    args = ap.parse_args(argv)
    args.budgets = args.budgets or (["1m"] if args.smoke else ["2m", "5m", "10m"])
    args.seeds = args.seeds or ([42] if args.smoke else [42, 43, 44])
    if args.smoke and args.input_size is None:
        args.input_size = 160
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("DATASETS_DIR", str(datasets_dir()))
    register_configs()
    budget_s = {b: parse_duration("--budgets", b) for b in args.budgets}
    work, results, start = Path(args.work).resolve(), [], time.perf_counter()
    specs = select_datasets(args.datasets, datasets_dir())
    if args.smoke:
        skipped = [s["key"] for s in specs if s["key"] not in SMOKE_DATASETS]
        if skipped and args.datasets is not None:
            raise SystemExit(f"--smoke subsamples only {', '.join(SMOKE_DATASETS)}: not {', '.join(skipped)}")
        if skipped:
            print(f"[bench] --smoke: no fixed subsample for {', '.join(skipped)}: left out", flush=True)
        specs = [s for s in specs if s["key"] in SMOKE_DATASETS]
        for s in specs:
            root = dataset_root("digits", work) if s["root"] is None else Path(s["root"])
            s["manifest"] = str(write_manifest(subsample_rows(s["key"], root), work / "manifests" / f"{s['key']}.csv"))
    minutes = estimate_minutes(len(specs), list(budget_s.values()), len(args.seeds), len(args.configs))
    print(f"[bench] {'smoke' if args.smoke else 'full-size'}: {', '.join(s['key'] for s in specs)}; budgeted runs "
          f"alone {len(specs)} datasets x ({' + '.join(args.budgets)}) x {len(args.seeds)} seeds x "
          f"{len(args.configs)} configs ~ {minutes:.1f} min ({minutes / 60:.1f} h) on top of the probe"
          f"{' and default' if args.with_default else ''} runs", flush=True)

    def record(spec: dict, config: str, budget: str | None, overrides: list[str], seed: int) -> None:
        tag = f"{config}_{budget}" if budget else config
        r = {"dataset": spec["key"], "config": config, "budget": budget, "seed": seed,
             "budget_s": budget_s[budget] if budget else None, **run(spec, overrides, tag, seed, args, work)}
        results.append(r)
        print(f"[bench] {spec['key']:12s} {tag:14s} seed {seed}: {r['split']} bal acc {r['balanced_accuracy']:.4f}  "
              f"{r['seconds']:.0f} s  ({r['mode']}, {r['epochs']} epoch rows{', reused' if r['reused'] else ''})  "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)

    for spec in specs:
        for seed in args.seeds:
            record(spec, "probe", None, PROBE, seed)
            if args.with_default:
                record(spec, "default", None, DEFAULT, seed)
            for budget in args.budgets:
                limit = [f"trainer.time_limit={budget}", f"trainer.epochs={EPOCH_CAP}"]
                for config in args.configs:
                    record(spec, config, budget, (["strategy=auto"] if config == "auto" else FIXED[config]) + limit,
                           seed)
    rows = verdict_rows(results)
    counts = target_counts(rows)
    table = markdown(rows, args.with_default)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"mode": "smoke" if args.smoke else "full", "datasets": specs, "results": results, "rows": rows,
           "targets": counts, "args": vars(args), "seconds": time.perf_counter() - start,
           "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    (out / "bench_budget.json").write_text(json.dumps(doc, indent=2, default=str))
    (out / "bench_budget.md").write_text(f"{table}\n\n{legend()}\n\n{summary_line(counts).removeprefix('[bench] ')}\n")
    print(table)
    print(legend())
    print(f"[bench] {len(results)} runs ({sum(r['reused'] for r in results)} reused) in {doc['seconds'] / 60:.1f} "
          f"min; load average {doc['load_average']}")
    print(summary_line(counts))


if __name__ == "__main__":
    main()
