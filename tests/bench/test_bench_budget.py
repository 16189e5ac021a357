"""bench/bench_budget.py without training: dataset discovery, the targets per dataset and budget ((a) more budget
not worse, (b) auto vs the probe, (c) auto vs the best fixed mode, (d) within the limit + 5%), the mean +- sd
cells, the reuse of a finished run dir, and the loop with `run` faked."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
spec = importlib.util.spec_from_file_location("bench_budget", ROOT / "bench" / "bench_budget.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _r(config: str, budget_s: float | None, score: float, seconds: float, seed: int = 42, dataset: str = "d",
       split: str = "test") -> dict:
    return {"dataset": dataset, "config": config, "budget_s": budget_s, "balanced_accuracy": score,
            "seconds": seconds, "seed": seed, "split": split}


# ---- datasets ----------------------------------------------------------------------------------------------

def test_discovery_takes_each_folder_with_train_class_folders(tmp_path):
    (tmp_path / "flowers" / "train" / "roses").mkdir(parents=True)  # known: conf/dataset/flowers.yaml
    (tmp_path / "mystery" / "train" / "a").mkdir(parents=True)  # unknown: dataset=folder
    (tmp_path / "mystery" / "val" / "a").mkdir(parents=True)
    (tmp_path / "no_train" / "a").mkdir(parents=True)  # class folders but no train/: not a dataset here
    (tmp_path / "empty_train" / "train").mkdir(parents=True)  # train/ without class folders
    (tmp_path / "README.md").write_text("x")
    found = {s["key"]: s for s in bench.discover(tmp_path)}
    assert list(found) == ["flowers", "mystery"]
    assert found["flowers"]["overrides"] == ["dataset=flowers", f"dataset.root={tmp_path / 'flowers'}"]
    assert found["mystery"]["overrides"] == ["dataset=folder", f"dataset.root={tmp_path / 'mystery'}"]
    specs = bench.select_datasets(None, tmp_path)  # the default: digits + every folder found
    assert [s["key"] for s in specs] == ["digits", "flowers", "mystery"]
    assert specs[0]["overrides"] == ["dataset=digits"] and specs[0]["root"] is None
    assert bench.discover(tmp_path / "missing") == []


def test_select_datasets_by_name_or_path_and_refuses_anything_else(tmp_path):
    (tmp_path / "base" / "hymenoptera" / "train" / "ants").mkdir(parents=True)
    (tmp_path / "elsewhere" / "train" / "x").mkdir(parents=True)
    picked = bench.select_datasets(["hymenoptera", str(tmp_path / "elsewhere")], tmp_path / "base")
    assert [s["key"] for s in picked] == ["hymenoptera", "elsewhere"]
    assert picked[1]["overrides"][0] == "dataset=folder"
    with pytest.raises(SystemExit, match="no_train"):
        bench.select_datasets(["no_train"], tmp_path / "base")


# ---- verdict -----------------------------------------------------------------------------------------------

def test_targets_per_dataset_and_budget_on_means_over_seeds():
    results = [_r("probe", None, 0.80, 20, s) for s in (1, 2)]
    for s, bump in ((1, 0.0), (2, 0.02)):  # two seeds: the rows are on the means
        results += [_r("auto", 120, 0.84 + bump, 118, s), _r("partial", 120, 0.83 + bump, 119, s),
                    _r("finetune", 120, 0.82 + bump, 121, s),  # 121/120: within 5%
                    _r("auto", 300, 0.83 + bump, 290, s),  # (a) misses: 84 at 5 min < 85 at 2 min
                    _r("partial", 300, 0.85 + bump, 299, s),
                    _r("finetune", 300, 0.86 + bump, 320, s)]  # 320/300 = 1.067: (d) misses
    short, long = bench.verdict_rows(results)
    assert (short["budget_s"], long["budget_s"]) == (120, 300)
    assert short["scores"]["auto"]["mean"] == pytest.approx(0.85)
    assert short["scores"]["auto"]["sd"] == pytest.approx(0.0141421, abs=1e-6)  # sample sd of 0.84, 0.86
    assert short["scores"]["probe"]["mean"] == pytest.approx(0.80)  # the probe counts at every budget
    assert short["targets"] == {"a": None, "b": True, "c": True, "d": True}  # (a): no shorter budget
    assert short["best_fixed"] == "partial"
    assert long["shorter_budget_s"] == 120 and long["best_fixed"] == "finetune"
    assert long["targets"] == {"a": False, "b": True, "c": False, "d": False}  # 84 < 87 - 1: (c) misses
    assert long["max_wall_over_budget"] == pytest.approx(320 / 300)
    counts = bench.target_counts([short, long])
    assert (counts["held"], counts["judged"]) == (4, 7) and counts["a"] == [0, 1] and counts["d"] == [1, 2]


def test_target_a_compares_consecutive_budgets_of_the_same_dataset():
    results = [_r("probe", None, 0.5, 5, dataset=d) for d in ("x", "y")]
    results += [_r("auto", 120, 0.90, 100, dataset="x"), _r("auto", 300, 0.91, 250, dataset="x"),
                _r("auto", 600, 0.905, 500, dataset="x"),  # below 5 min's 91: misses
                _r("auto", 120, 0.70, 100, dataset="y"), _r("auto", 300, 0.70, 250, dataset="y")]  # equal: holds
    rows = {(r["dataset"], r["budget_s"]): r["targets"]["a"] for r in bench.verdict_rows(results)}
    assert rows == {("x", 120): None, ("x", 300): True, ("x", 600): False, ("y", 120): None, ("y", 300): True}


def test_target_b_auto_may_trail_the_probe_by_half_a_point_only():
    results = [_r("probe", None, 0.900, 5), _r("auto", 60, 0.895, 50), _r("auto", 120, 0.8949, 100)]
    at_1m, at_2m = bench.verdict_rows(results)
    assert at_1m["targets"]["b"] is True  # exactly 0.5 pt below: holds
    assert at_2m["targets"]["b"] is False  # 0.51 pt below: misses
    assert at_1m["targets"]["c"] is None  # --configs auto: no fixed mode to judge (c) on
    assert bench.target_counts([at_1m, at_2m])["judged"] == 5  # a (once), b twice, d twice


def test_target_c_and_d_thresholds():
    results = [_r("probe", None, 0.5, 5), _r("auto", 100, 0.80, 105), _r("finetune", 100, 0.81, 90),
               _r("auto", 200, 0.80, 150), _r("finetune", 200, 0.8101, 211)]
    one, two = bench.verdict_rows(results)
    assert one["targets"]["c"] is True and one["targets"]["d"] is True  # 1 pt below; 105/100 exactly 5% over
    assert two["targets"]["c"] is False and two["targets"]["d"] is False  # 1.01 pt below; 211/200 5.5% over


# ---- table -------------------------------------------------------------------------------------------------

def test_mean_sd_cells_in_points():
    assert bench.fmt_score(bench.stats([_r("auto", 60, 0.80, 50), _r("auto", 60, 0.84, 70)])) == "82.0 ± 2.8 (60 s)"
    assert bench.fmt_score(bench.stats([_r("auto", 60, 0.8123, 50)])) == "81.2 (50 s)"  # one seed: no sd
    assert bench.fmt_score(None) == "-"
    assert bench.fmt_score({"mean": 0.5, "sd": 0.01, "seconds": 3}, seconds=False) == "50.0 ± 1.0"


def test_table_rows_say_which_split_and_which_targets():
    results = [_r("probe", None, 0.78, 20, split="val"), _r("auto", 120, 0.825, 118, split="val"),
               _r("partial", 120, 0.83, 119, split="val"), _r("default", None, 0.80, 400, split="val")]
    (row,) = bench.verdict_rows(results)
    table = bench.markdown([row], with_default=True)
    assert "| d | val (no test split) | 2 min | 82.5 (118 s) | 78.0 (20 s) | 83.0 (119 s) | - | 80.0 (400 s) |" \
        in table
    assert "(a) -, (b) ok, (c) ok, (d) ok" in table and "5-epoch default" in table
    assert "default" not in bench.markdown([row]).split("\n")[0]  # the default column only with --with-default
    assert bench.summary_line(bench.target_counts([row])).startswith("[bench] targets: 3 of 3 hold")


# ---- runs --------------------------------------------------------------------------------------------------

def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"smoke": False, "input_size": None, "extra": [], **kw})


def test_a_finished_run_dir_is_reused_not_rerun(tmp_path, monkeypatch):
    spec_ = bench.dataset_spec("mystery", tmp_path / "mystery")
    run_dir = tmp_path / "w" / "runs" / "full" / "mystery" / "auto_2m_seed42"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({
        "status": "ok", "test": {"balanced_accuracy": 0.875}, "val": {"balanced_accuracy": 0.9}, "mode": "partial",
        "train_seconds": 117.0, "history": [{}, {}], "decision": {"mode": "partial", "budget": {"limit": "2m"}}}))

    def no_training(overrides):
        raise AssertionError("a finished run must not be trained again")

    monkeypatch.setattr(bench, "execute", no_training)
    r = bench.run(spec_, ["strategy=auto"], "auto_2m", 42, _args(), tmp_path / "w")
    assert r["reused"] and r["balanced_accuracy"] == 0.875 and r["split"] == "test"
    assert r["seconds"] == 117.0  # no bench note beside it: the run's own train_seconds
    assert r["auto_budget"] == {"limit": "2m"} and r["epochs"] == 2


def test_a_fresh_run_writes_its_note_and_a_broken_dir_is_moved_aside(tmp_path, monkeypatch):
    spec_ = bench.dataset_spec("digits", None)
    run_dir = tmp_path / "w" / "runs" / "full" / "digits" / "probe_seed42"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_text("interrupted")  # no metrics.json: the pipeline would refuse this dir
    calls = []

    def fake_execute(overrides):
        calls.append(overrides)
        return {"status": "ok", "val": {"balanced_accuracy": 0.7}, "mode": "linear_probe"}, 12.5  # no test split

    monkeypatch.setattr(bench, "execute", fake_execute)
    r = bench.run(spec_, ["strategy=linear_probe"], "probe", 42, _args(), tmp_path / "w")
    assert len(calls) == 1 and f"output_dir={run_dir}" in calls[0] and "dataset=digits" in calls[0]
    assert (run_dir.parent / "probe_seed42.incomplete-1" / "last.pt").is_file()
    assert not r["reused"] and r["split"] == "val" and r["seconds"] == 12.5 and r["auto_budget"] is None
    note = json.loads((run_dir.parent / "probe_seed42.bench.json").read_text())
    assert note == {"overrides": calls[0], "seconds": 12.5}
    run_dir.mkdir()  # as the pipeline leaves it: a finished run, now reused with the bench's own seconds
    (run_dir / "metrics.json").write_text(json.dumps({"status": "ok", "val": {"balanced_accuracy": 0.7},
                                                      "train_seconds": 11.0}))
    again = bench.run(spec_, ["strategy=linear_probe"], "probe", 42, _args(), tmp_path / "w")
    assert again["reused"] and again["seconds"] == 12.5 and len(calls) == 1
    with pytest.raises(SystemExit, match="other overrides"):  # another --extra: not the same run
        bench.run(spec_, ["strategy=linear_probe"], "probe", 42, _args(extra=["optim.lr=1"]), tmp_path / "w")


def test_main_runs_every_configuration_per_budget_and_writes_the_table(tmp_path, monkeypatch, capsys):
    """The bench's loop with `run` faked (no training): the probe once per seed, auto/partial/finetune per
    budget, budgets parsed from their text, json and md written to --out, the targets line printed."""
    calls = []

    def fake_run(spec_, overrides, tag, seed, args, work):
        calls.append((spec_["key"], tag, seed))
        budget = next((o.split("=")[1] for o in overrides if o.startswith("trainer.time_limit=")), None)
        seconds = {None: 50.0, "1m": 59.0, "3m": 170.0}[budget]
        score = {"default": 0.80, "probe": 0.78, "auto": 0.84, "partial": 0.83, "finetune": 0.82}[tag.split("_")[0]]
        return {"seconds": seconds, "balanced_accuracy": score + 0.02 * (seed % 2 == 0), "split": "test",
                "mode": "partial", "epochs": 3, "planned_epochs": 3, "reused": False, "auto_budget": None,
                "overrides": overrides}

    base = tmp_path / "datasets"
    (base / "mystery" / "train" / "a").mkdir(parents=True)
    monkeypatch.setenv("DATASETS_DIR", str(base))
    monkeypatch.setattr(bench, "run", fake_run)
    bench.main(["--budgets", "1m", "3m", "--seeds", "1", "2", "--work", str(tmp_path / "w"),
                "--out", str(tmp_path / "out")])
    per_seed = ["probe", "auto_1m", "partial_1m", "finetune_1m", "auto_3m", "partial_3m", "finetune_3m"]
    assert calls == [(d, t, s) for d in ("digits", "mystery") for s in (1, 2) for t in per_seed]
    doc = json.loads((tmp_path / "out" / "bench_budget.json").read_text())
    assert {r["budget"] for r in doc["results"]} == {None, "1m", "3m"}
    assert [(r["dataset"], r["budget_s"], r["best_fixed"]) for r in doc["rows"]] == [
        ("digits", 60.0, "partial"), ("digits", 180.0, "partial"), ("mystery", 60.0, "partial"),
        ("mystery", 180.0, "partial")]
    assert doc["targets"]["held"] == doc["targets"]["judged"] == 14  # (a) twice, (b), (c), (d) four times
    md = (tmp_path / "out" / "bench_budget.md").read_text()
    assert "| digits | test | 3 min | 85.0 ± 1.4 (170 s) | 79.0 ± 1.4 (50 s) | 84.0 ± 1.4 (170 s) |" in md
    assert "targets: 14 of 14 hold" in capsys.readouterr().out
    calls.clear()
    bench.main(["--datasets", "digits", "--budgets", "3m", "--configs", "auto", "--work", str(tmp_path / "w"),
                "--out", str(tmp_path / "auto_only")])
    assert calls == [("digits", t, s) for s in (42, 43, 44) for t in ("probe", "auto_3m")]  # 3 seeds by default
    (row,) = json.loads((tmp_path / "auto_only" / "bench_budget.json").read_text())["rows"]
    assert row["best_fixed"] is None and row["targets"]["c"] is None


def test_smoke_subsamples_through_bench_recipes(tmp_path, monkeypatch):
    seen = []

    def fake_run(spec_, overrides, tag, seed, args, work):
        seen.append((spec_.get("manifest"), tag, seed, args.input_size))
        return {"seconds": 59.0, "balanced_accuracy": 0.8, "split": "test", "mode": "x", "epochs": 1,
                "reused": False, "overrides": overrides}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "dataset_root", lambda name, work: tmp_path)
    monkeypatch.setattr(bench, "subsample_rows", lambda name, root: [("a.png", "x", "train")])
    bench.main(["--smoke", "--datasets", "digits", "--configs", "auto", "--work", str(tmp_path / "w"),
                "--out", str(tmp_path / "out")])
    manifest = str(tmp_path / "w" / "manifests" / "digits.csv")
    assert seen == [(manifest, "probe", 42, 160), (manifest, "auto_1m", 42, 160)]  # budgets 1m, seed 42, 160 px
    with pytest.raises(SystemExit, match="subsamples only"):
        (tmp_path / "other" / "train" / "a").mkdir(parents=True)
        bench.main(["--smoke", "--datasets", str(tmp_path / "other"), "--work", str(tmp_path / "w")])
