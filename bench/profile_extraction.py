"""Where the cached-probe extraction spends its CPU: py-spy samples of the extraction bench part, by stage.

    .venv/bin/python bench/profile_extraction.py [--dataset hymenoptera] [--size 224]

Runs `bench/bench.py --part pipeline_extract` under `py-spy record --subprocesses` (main process and
DataLoader workers) and counts on-CPU samples per stage: model forward (main), image decode and resize,
transform, collate / IPC (workers), start-up (imports, model build, worker start). On a 2-core machine the
workers' decode competes with the forward for the same cores, which is why extraction img/s stays below the
bare forward's. Prints the table and writes outputs/bench/profile_extraction.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = [  # first match wins, checked against the whole stack
    ("model forward", ("pooled_features", "forward_features", "forward_head")),
    ("decode + resize (workers)", ("load_rgb", "decode_rgb", "imdecode", "_decode", "resize")),
    ("transform (workers)", ("albumentations", "Compose.__call__")),
    ("collate / IPC", ("collate", "_worker_loop", "reduce_storage", "rebuild_storage", "_next_data")),
    ("extraction loop, other", ("extract (features/cache.py",)),
]


def classify(stack: str) -> str:
    for name, needles in STAGES:
        if any(n in stack for n in needles):
            return name
    return "start-up and the rest"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="hymenoptera")
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-o", str(raw), "--format", "raw",
               "--subprocesses", "--rate", "50", "--", sys.executable, str(ROOT / "bench" / "bench.py"), "--part",
               "pipeline_extract", "--dataset", a.dataset, "--size", str(a.size), "--tmp", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not raw.is_file():
            raise SystemExit(f"py-spy failed (needs ptrace permission):\n{proc.stderr[-1500:]}")
        result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
        counts = Counter()
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            counts[classify(stack)] += int(n)
    total = sum(counts.values())
    print(f"extraction: {result['img_per_s']:.1f} img/s over {result['images']} images; {total} CPU samples\n")
    print("| stage | samples | share |\n|---|---|---|")
    for name, n in counts.most_common():
        print(f"| {name} | {n} | {100 * n / total:.1f}% |")
    out = ROOT / "outputs" / "bench" / "profile_extraction.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"extract": result, "samples": dict(counts)}, indent=2))


if __name__ == "__main__":
    main()
