"""Multi-label data (issue 34, its data part): a manifest whose label cells hold several `|`-joined labels is read as
multi-label, split by iterative stratification so rare labels reach both sides, written back to split.csv as it was
given, and audited (labels per split, no-label images, rare labels, co-occurrence); training refuses it in one line."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import COLORS, compose_cfg, write_image
from pipeline.audit import main as audit_main
from pipeline.data.data_audit import audit_dataset
from pipeline.data.folder import SplitLayout, load_imagefolder
from pipeline.data.listing import list_source
from pipeline.errors import ConfigError
from pipeline.train import train

LABELS = ("cat", "dog", "car", "tree")


def write_tagged(root: Path, rows: list[str], *, header: str = "path,labels") -> Path:
    """`root/tags.csv` with one generated PNG per row (`rows`: the label cells, e.g. "cat|dog")."""
    colours = list(COLORS.values())
    lines = [header]
    for i, cell in enumerate(rows):
        write_image(root / "img" / f"{i}.png", colours[i % len(colours)], size=32, seed=i)
        lines.append(f"img/{i}.png,{cell}")
    (root / "tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "tags.csv"


def mixed_rows(n: int = 60) -> list[str]:
    """Mostly cat/dog/car combinations, `tree` on 4 images only, and 5 images with no label."""
    rng = np.random.default_rng(0)
    rows = ["|".join(sorted(set(rng.choice(LABELS[:3], size=rng.integers(1, 3)).tolist()))) for _ in range(n - 9)]
    return rows + ["tree|cat", "tree", "tree|dog", "tree"] + [""] * 5


def test_a_manifest_with_several_labels_per_row_is_multilabel(tmp_path):
    manifest = write_tagged(tmp_path, ["cat|dog", "dog", " car | cat ", ""] * 3)
    listing = list_source(tmp_path, manifest=str(manifest))
    assert listing.multilabel and listing.classes == ["car", "cat", "dog"]
    paths, labels = listing.splits["train"]
    assert labels[:4] == [(1, 2), (2,), (0, 1), ()]  # sorted indices; the empty cell is an image with no label
    single = write_tagged(tmp_path / "single", ["cat", "dog"] * 3)
    assert not list_source(tmp_path, manifest=str(single)).multilabel  # one label per row: single-label, as before


@pytest.mark.parametrize("rows, overrides, words", [
    (["cat|dog", "dog"], {"task": "single"}, r"line 2: 2 labels \(cat\|dog\) in a single-label manifest; .*"
                                             r"dataset.task=multilabel"),
    (["cat", ""], {}, r"line 3: empty label in a single-label manifest"),
])
def test_labels_that_do_not_fit_the_task_are_a_one_line_error(tmp_path, rows, overrides, words):
    manifest = write_tagged(tmp_path, rows)
    with pytest.raises(ConfigError, match=words) as e:
        list_source(tmp_path, manifest=str(manifest), **overrides)
    assert "\n" not in str(e.value)


def test_folder_layouts_stay_single_label(tmp_path):
    write_image(tmp_path / "train" / "cat" / "0.png", COLORS["red"])
    with pytest.raises(ConfigError, match="dataset.task=multilabel needs a CSV manifest"):
        list_source(tmp_path, task="multilabel")


def test_iterative_stratification_puts_a_rare_label_on_both_sides(tmp_path):
    """`tree` is on 4 of 60 images: every seed's 25% val gets 1 or 2 of them (a draw that ignored the labels would
    leave val without any on some seeds), and every label's val share stays near 25%."""
    manifest = write_tagged(tmp_path, mixed_rows())
    layout = SplitLayout(manifest=str(manifest), val_fraction=0.25)
    for seed in range(5):
        data = load_imagefolder(tmp_path, layout, seed=seed, workers=1)
        train, val = data.train.counts(), data.val.counts()
        assert 1 <= val["tree"] <= 2 and train["tree"] >= 2, (seed, train, val)
        for label in ("cat", "dog", "car"):
            assert abs(val[label] / (train[label] + val[label]) - 0.25) < 0.1, (seed, label, train, val)
        assert data.val_source == "iteratively stratified 25% of all images" and len(data.val) == 15


def test_split_csv_keeps_the_labels_and_reproduces_the_split(tmp_path):
    manifest = write_tagged(tmp_path, mixed_rows())
    data = load_imagefolder(tmp_path, SplitLayout(manifest=str(manifest)), seed=3, workers=1)
    rows = list(data.rows())
    assert Counter(r[2] for r in rows) == {"train": len(data.train), "val": len(data.val)}
    written = tmp_path / "split.csv"
    with open(written, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    again = load_imagefolder(tmp_path, SplitLayout(manifest=str(written)), seed=99, workers=1)
    assert again.multilabel and again.val.paths == data.val.paths and again.val.labels == data.val.labels
    assert again.train.labels == data.train.labels  # empty labels, several labels: all given back as they were


def test_the_audit_counts_labels_flags_rare_ones_and_draws_co_occurrence(tmp_path):
    manifest = write_tagged(tmp_path, mixed_rows())
    data = load_imagefolder(tmp_path, SplitLayout(manifest=str(manifest)), seed=0, workers=1)
    report = audit_dataset(data)
    ml = report["multilabel"]
    assert report["summary"]["rare_labels"] == 1 and set(ml["rare"]) == {"tree"}
    assert any(w.startswith("RARE LABELS: 1 label(s)") and "tree" in w for w in report["warnings"])
    hot = np.zeros((len(data.train), len(data.classes)), int)
    for row, label in enumerate(data.train.labels):
        hot[row, list(label)] = 1
    co = np.asarray(ml["co_occurrence"])
    assert np.array_equal(co, hot.T @ hot) and list(np.diag(co)) == list(data.train.counts().values())
    no_label = sum(not y for y in data.train.labels)
    assert ml["splits"]["train"]["no_label"] == no_label and no_label > 0


def test_make_audit_on_tagged_data_writes_the_label_tables_and_the_co_occurrence_png(tmp_path, capsys):
    manifest = write_tagged(tmp_path, mixed_rows())
    out = tmp_path / "audit"
    audit_main(["dataset=folder", f"dataset.root={tmp_path}", f"dataset.manifest={manifest}", "backbone=tiny",
                f"out={out}"])
    report = json.loads((out / "audit.json").read_text())
    assert report["shortcuts_skipped"].startswith("multi-label") and report["label_issues"]["skipped"]
    assert (out / "label_cooccurrence.png").stat().st_size > 1000
    text = (out / "audit.md").read_text()
    assert "| tree (rare) |" in text and "image(s) with no label" in text


def test_training_on_multilabel_data_is_refused_in_one_line(tmp_path):
    manifest = write_tagged(tmp_path, mixed_rows())
    cfg = compose_cfg([f"output_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}", "trainer=smoke",
                       "dataset=folder", f"dataset.root={tmp_path}", f"dataset.manifest={manifest}",
                       "backbone=tiny"])
    with pytest.raises(ConfigError, match=r"holds multi-label data \(4 labels\): training on it is not built") as e:
        train(cfg)
    assert "\n" not in str(e.value) and json.loads((tmp_path / "run" / "audit.json").read_text())["multilabel"]
