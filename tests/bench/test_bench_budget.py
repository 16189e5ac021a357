"""bench/bench_budget.py: the verdict per dataset and budget (best fixed mode, limit + 5%, auto within 1 pt, auto
not below the default when the budget covers the default's time) and its table."""
from __future__ import annotations

import importlib.util
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
spec = importlib.util.spec_from_file_location("bench_budget", ROOT / "bench" / "bench_budget.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _r(config: str, budget_s: float | None, score: float, seconds: float) -> dict:
    return {"dataset": "d", "config": config, "budget_s": budget_s, "balanced_accuracy": score, "seconds": seconds}


def test_verdict_compares_auto_with_the_best_fixed_mode_and_the_default():
    results = [_r("default", None, 0.80, 100), _r("probe", 60, 0.78, 20), _r("partial", 60, 0.83, 61),
               _r("finetune", 60, 0.81, 62), _r("auto", 60, 0.825, 60), _r("probe", 180, 0.78, 20),
               _r("partial", 180, 0.86, 170), _r("finetune", 180, 0.88, 190), _r("auto", 180, 0.85, 175)]
    short, long = bench.verdict_rows(results)
    assert short["best_fixed"] == "partial" and short["auto_within_1pt"] and short["within_limit"]
    assert short["auto_not_below_default"] is None  # 60 s < the default's 100 s: not judged
    assert long["best_fixed"] == "finetune" and not long["auto_within_1pt"]  # 0.85 < 0.88 - 0.01
    assert long["auto_not_below_default"] is True
    assert long["max_wall_over_budget"] == 190 / 180 and not long["within_limit"]  # 5.6% over: misses the 5%
    table = bench.markdown([short, long])
    assert "| d | 1 min | 82.5 (60) | partial 83.0 | 83.0 / 81.0 / 78.0 | 80.0 (100) |" in table
    assert "OVER LIMIT" in table and "auto MISSES 1 pt" in table and "budget < default's time" in table
