"""bench/bench_recipes.py: the fixed subsample, the baseline pinning and the rule that picks the recipe."""
from __future__ import annotations

import importlib.util

from conftest import ROOT, write_image

spec = importlib.util.spec_from_file_location("bench_recipes", ROOT / "bench" / "bench_recipes.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_subsample_is_fixed_disjoint_and_sized(tmp_path):
    for split, n in (("train", 150), ("val", 20)):
        for c in ("a", "b"):
            for i in range(n):
                write_image(tmp_path / split / c / f"{c}{i}.png", (i % 255, 0, 0), size=8, seed=i)
    rows = bench.subsample_rows("flowers", tmp_path)
    assert rows == bench.subsample_rows("flowers", tmp_path)  # the same split for every seed and every run
    per = {(label, split): sum(1 for _, lab, sp in rows if lab == label and sp == split)
           for label in ("a", "b") for split in ("train", "val", "test")}
    assert per == {(c, s): n for c in ("a", "b") for s, n in zip(("train", "val", "test"), bench.SUBSAMPLE["flowers"])}
    assert len({p for p, _, _ in rows}) == len(rows)  # no image in two splits


def test_technique_overrides_replace_the_pinned_baseline_keys():
    merged = bench.merged(bench.BASELINE, ["augment=strong", "trainer.ema=true"])
    assert "augment=strong" in merged and "augment=light" not in merged
    assert "trainer.ema=true" in merged and "trainer.ema=false" not in merged
    assert "features.head_epochs=5" in merged


def _summary(default: list[float], technique: list[float]) -> dict:
    def cell(values):
        mean, std = bench.mean_std(values)
        return {"balanced_accuracy": mean, "balanced_accuracy_std": std}
    return {"default": cell(default), "ema": cell(technique)}


def test_a_technique_qualifies_only_with_gains_beyond_noise_on_two_datasets_and_no_loss():
    base = [0.80, 0.81, 0.82]
    win, tie, lose = [0.85, 0.86, 0.87], [0.80, 0.82, 0.81], [0.70, 0.71, 0.72]
    techniques = {"ema": bench.TECHNIQUES["ema"]}
    assert bench.verdicts({"a": _summary(base, win), "b": _summary(base, win)}, techniques)["ema"]["qualifies"]
    assert not bench.verdicts({"a": _summary(base, win), "b": _summary(base, tie)}, techniques)["ema"]["qualifies"]
    three = {"a": _summary(base, win), "b": _summary(base, win), "c": _summary(base, lose)}
    verdict = bench.verdicts(three, techniques)["ema"]
    assert verdict["losses"] == ["c"] and not verdict["qualifies"]
