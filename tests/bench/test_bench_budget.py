"""bench/bench_budget.py: the verdict per dataset and budget (best fixed mode, limit + 5%, auto within 1 pt, auto
not below the default when the budget covers the default's time) and its table."""
from __future__ import annotations

import importlib.util
import json
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


def test_main_runs_every_configuration_per_budget_and_writes_the_table(tmp_path, monkeypatch, capsys):
    """The bench's loop with `run` faked (no training): default and probe once, auto/partial/finetune per budget,
    budgets parsed from their text, the probe counted at every budget, json and md written to --out."""
    calls = []

    def fake_run(dataset, manifest, overrides, tag, seed, args, work):
        calls.append(tag)
        budget = next((o.split("=")[1] for o in overrides if o.startswith("trainer.time_limit=")), None)
        seconds = {None: 50.0, "1m": 59.0, "3m": 170.0}[budget]
        score = {"default": 0.80, "probe": 0.78, "auto": 0.84, "partial": 0.83, "finetune": 0.82}[tag.split("_")[0]]
        return {"seconds": seconds, "balanced_accuracy": score, "mode": "partial", "epochs": 3, "planned_epochs": 3,
                "overrides": overrides}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "dataset_root", lambda name, work: tmp_path)
    monkeypatch.setattr(bench, "subsample_rows", lambda name, root: [("a.png", "x", "train")])
    bench.main(["--datasets", "digits", "--budgets", "1m", "3m", "--work", str(tmp_path / "w"),
                "--out", str(tmp_path / "out")])
    assert calls == ["default_epochs5", "probe_epochs5", "auto_1m", "partial_1m", "finetune_1m", "auto_3m",
                     "partial_3m", "finetune_3m"]
    doc = json.loads((tmp_path / "out" / "bench_budget.json").read_text())
    assert {r["budget"] for r in doc["results"]} == {None, "1m", "3m"}  # the budget asked, beside the plan's epochs
    assert [(r["budget_s"], r["best_fixed"], r["auto_within_1pt"]) for r in doc["rows"]] == [
        (60.0, "partial", True), (180.0, "partial", True)]
    assert doc["rows"][0]["auto_not_below_default"] is True  # 60 s >= the default's 50 s
    assert "| digits | 3 min | 84.0 (170) |" in (tmp_path / "out" / "bench_budget.md").read_text()
    calls.clear()
    bench.main(["--datasets", "digits", "--budgets", "3m", "--configs", "auto", "--work", str(tmp_path / "w"),
                "--out", str(tmp_path / "auto_only")])
    assert calls == ["default_epochs5", "probe_epochs5", "auto_3m"]  # --configs auto: auto alone per budget
    (row,) = json.loads((tmp_path / "auto_only" / "bench_budget.json").read_text())["rows"]
    assert row["best_fixed"] == "probe" and row["fixed"] == {"probe": 0.78}
