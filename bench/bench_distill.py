"""Distillation measured (issue 35): a student distilled from a bigger teacher against the same student trained
alone at equal time, over seeds, and the latency of both models.

    .venv/bin/python bench/bench_distill.py [--dataset hymenoptera] [--teacher-backbone tf_efficientnet_lite2]
        [--teacher-epochs 4] [--student tf_efficientnet_lite0] [--budget 2m] [--seeds 42 43 44]
        [--work DIR] [--out DIR]                                               (make bench-distill ARGS="...")

1. The teacher: one `strategy=partial trainer.epochs=N` run of the teacher backbone (`dataset.test_fraction=0.2`
   where the dataset has no test folder).
2. Per seed, two student runs under the same `trainer.time_limit` with `strategy=partial`: alone, on the teacher's
   split.csv; and `make distill`'s run. Each distilled run gets a fresh feature cache, so it pays the teacher's
   logits pass inside its budget (later students would reuse the cached logits).
3. Latency: batch-1 forward of each shipped `best` (TTA and temperature as shipped), torch on CPU, median of 30
   after 5 warm-up calls, at its own input size, both measured in this one process.
Writes bench_distill.json/.md to --out. Needs ../shared/datasets (DATASETS_DIR) for the photo sets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.model import checkpoint  # noqa: E402
from pipeline.model.calibrated import wrap_for_inference  # noqa: E402

SHARED = Path(os.environ.get("DATASETS_DIR", ROOT.parent / "shared" / "datasets"))
METRICS = ("balanced_accuracy", "accuracy")


def run_train(args: list[str], run_dir: Path) -> dict:
    """`python -m pipeline.train args` into `run_dir` (reused when it finished before); its metrics.json."""
    metrics = run_dir / "metrics.json"
    if not (metrics.is_file() and json.loads(metrics.read_text()).get("status") == "ok"):
        subprocess.run([sys.executable, "-m", "pipeline.train", f"output_dir={run_dir}", "trainer.progress=false",
                        *args], cwd=ROOT, check=True)
    return json.loads(metrics.read_text())


def dataset_args(name: str) -> list[str]:
    root = SHARED / name
    args = [f"dataset={name}", f"dataset.root={root}"]
    return args + ([] if (root / "test").is_dir() else ["dataset.test_fraction=0.2"])


@torch.inference_mode()
def latency_ms(run_dir: Path, repeats: int = 30) -> float:
    """Median batch-1 forward (ms) of the run's shipped best at its own input size."""
    model, meta = checkpoint.load_checkpoint(run_dir, "best", local=True)
    model = wrap_for_inference(model, meta).eval()
    x = torch.randn(1, *meta["preprocessing"]["input_size"])
    for _ in range(5):
        model(x)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


def summary(runs: list[dict], split: str, key: str) -> tuple[float, float]:
    values = [100 * r[split][key] for r in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(result: dict) -> str:
    t = result["teacher"]
    lines = [f"teacher {t['backbone']} ({t['epochs']} partial epochs, {t['seconds']:.0f} s): test balanced accuracy "
             f"{100 * t['test']['balanced_accuracy']:.1f}, val {100 * t['val']['balanced_accuracy']:.1f}; "
             f"latency {t['latency_ms']:.1f} ms (batch 1)", "",
             f"| student {result['student']} at {result['budget']} | test bal. acc | test acc | val bal. acc | "
             "wall s | latency ms |", "|---|---|---|---|---|---|"]
    for name in ("alone", "distilled"):
        runs = result[name]
        cells = [f"{m:.1f} ± {s:.1f}" for m, s in (summary(runs, "test", "balanced_accuracy"),
                                                  summary(runs, "test", "accuracy"),
                                                  summary(runs, "val", "balanced_accuracy"))]
        wall = statistics.mean(r["train_seconds"] for r in runs)
        lines.append(f"| {name} | {' | '.join(cells)} | {wall:.0f} | {result['student_latency_ms']:.1f} |")
    lines += ["", f"Seeds {result['seeds']}, mean ± sample sd. Teacher / student latency: "
              f"{t['latency_ms'] / result['student_latency_ms']:.2f}x."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="hymenoptera")
    ap.add_argument("--teacher-backbone", default="tf_efficientnet_lite2")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--student", default="tf_efficientnet_lite0")
    ap.add_argument("--budget", default="2m")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "distill"))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = work / f"teacher_{args.teacher_backbone}"
    data = dataset_args(args.dataset)
    teacher = run_train([*data, f"backbone={args.teacher_backbone}", "strategy=partial",
                         f"trainer.epochs={args.teacher_epochs}", "seed=42"], teacher_dir)
    student = [f"backbone={args.student}", "strategy=partial", f"trainer.time_limit={args.budget}"]
    alone, distilled = [], []
    for seed in args.seeds:
        alone.append(run_train([*data, f"dataset.manifest={teacher_dir / 'split.csv'}", *student, f"seed={seed}"],
                               work / f"alone_{seed}"))
        distilled.append(run_train([f"distill.teacher={teacher_dir}", *student, f"seed={seed}",
                                    f"features.cache_dir={work / f'cache_{seed}'}"], work / f"distilled_{seed}"))
    result = {"dataset": args.dataset, "student": args.student, "budget": args.budget, "seeds": args.seeds,
              "teacher": {"backbone": args.teacher_backbone, "epochs": args.teacher_epochs,
                          "seconds": teacher["train_seconds"], "test": teacher["test"], "val": teacher["val"],
                          "latency_ms": latency_ms(teacher_dir)},
              "student_latency_ms": latency_ms(work / f"alone_{args.seeds[0]}"),
              "alone": [{k: r[k] for k in ("test", "val", "train_seconds")} for r in alone],
              "distilled": [{k: r[k] for k in ("test", "val", "train_seconds", "distill")} for r in distilled]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distill.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (out / "bench_distill.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
