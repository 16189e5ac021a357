"""Any folder layout: a flat tree of class folders, CSV manifests (with and without a split column), the run's
split.csv given back as a manifest, bad manifests as one-line errors, and audit/preview on both."""
from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import CLASSES, COLORS, write_image
from pipeline.data.folder import SplitLayout, check_layout, load_imagefolder
from pipeline.data.manifest import read_manifest
from pipeline.errors import ConfigError, MissingFileError, PipelineError

TINY = ("dataset=folder", "backbone=tiny", "backbone.input_size=32", "strategy=finetune")


def write_flat(root: Path, per_class: int = 10) -> Path:
    """`root/<class>/<image>`: no train/ folder."""
    for c in CLASSES:
        for i in range(per_class):
            write_image(root / c / f"{c}_{i}.png", COLORS[c], size=32, seed=1000 * len(c) + i)
    return root


def read_split(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_manifest(path: Path, rows: list[tuple], header: str = "path,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n", encoding="utf-8")
    return path


def test_flat_tree_trains_and_its_split_csv_given_back_reproduces_the_split(tmp_path, cfg_factory):
    from pipeline.train import train

    flat = write_flat(tmp_path / "flat")
    write_image(flat / "red" / ".ipynb_checkpoints" / "red_0-checkpoint.png", COLORS["red"], size=32)
    cfg = cfg_factory(*TINY, f"dataset.root={flat}", "dataset.val_fraction=0.2", "dataset.test_fraction=0.2")
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    rows = read_split(run / "split.csv")
    assert list(rows[0]) == ["path", "label", "split"] and all(Path(r["path"]).is_absolute() for r in rows)
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [18, 6, 6]  # 30 images: 20% val, 20% test
    assert {r["label"] for r in by_split["test"]} == set(CLASSES) and metrics["test"]["accuracy"] >= 0
    assert not any(".ipynb_checkpoints" in r["path"] for r in rows)
    summary = (run / "summary.md").read_text()
    assert "class folders" in summary and "red_0-checkpoint.png`: in a hidden folder (.ipynb_checkpoints)" in summary

    again = cfg_factory(*TINY, f"dataset.manifest={run / 'split.csv'}", "seed=7")  # another seed: the CSV decides
    again.output_dir = str(tmp_path / "again")
    train(again)
    assert (tmp_path / "again" / "split.csv").read_text() == (run / "split.csv").read_text()
    assert "CSV manifest" in (tmp_path / "again" / "summary.md").read_text()


def test_manifest_without_split_column_trains_with_a_stratified_split(tmp_path, cfg_factory):
    from pipeline.train import train

    flat = write_flat(tmp_path / "images")
    shutil.copy(flat / "red" / "red_0.png", flat / "red" / "red_0_copy.png")  # identical file: one side only
    rows = [(f"images/{c}/{p.name}", f"{c}_label") for c in CLASSES for p in sorted((flat / c).iterdir())]
    manifest = write_manifest(tmp_path / "labels.csv", rows)
    cfg = cfg_factory(*TINY, f"dataset.manifest={manifest}")
    train(cfg)
    split = read_split(Path(cfg.output_dir) / "split.csv")
    assert len(split) == 31 and {r["label"] for r in split} == {f"{c}_label" for c in CLASSES}
    assert sum(r["split"] == "val" for r in split) == 6  # 20% of 31 distinct-ish images, stratified
    sides = {r["split"] for r in split if Path(r["path"]).name in ("red_0.png", "red_0_copy.png")}
    assert len(sides) == 1
    assert str(flat / "red" / "red_0.png") in {r["path"] for r in split}  # relative to the CSV's folder


def test_identical_files_stay_on_one_side_of_every_drawn_split(tmp_path):
    flat = write_flat(tmp_path / "flat", per_class=8)
    for c in CLASSES:  # three copies of two files per class
        for i in range(2):
            for k in range(3):
                shutil.copy(flat / c / f"{c}_{i}.png", flat / c / f"{c}_{i}_dup{k}.png")
    data = load_imagefolder(flat, SplitLayout(val_fraction=0.25, test_fraction=0.25), seed=3, workers=1)
    side = {p: name for name in ("train", "val", "test") for p in getattr(data, name).paths}
    assert len(side) == 3 * 14
    for c in CLASSES:
        for i in range(2):
            group = [str(flat / c / f"{c}_{i}.png")] + [str(flat / c / f"{c}_{i}_dup{k}.png") for k in range(3)]
            assert len({side[p] for p in group}) == 1, group
    assert len(data.test) and len(data.val) and data.layout.startswith("class folders")
    assert data.test_source == "stratified 25% of all images"


def test_manifest_split_column_is_used_as_given_and_hidden_rows_are_skipped(tmp_path):
    flat = write_flat(tmp_path / "img", per_class=4)
    write_image(flat / ".cache" / "x.png", (0, 0, 0))
    rows = [(f"img/{c}/{c}_{i}.png", c, ["train", "train", "val", "test"][i]) for c in CLASSES for i in range(4)]
    manifest = write_manifest(tmp_path / "m.csv", rows + [("img/.cache/x.png", "red", "train")], "Path, Label ,SPLIT")
    data = load_imagefolder(tmp_path, SplitLayout(manifest=str(manifest)), workers=1)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    assert data.val_source == data.test_source == "manifest split column"
    assert data.skipped == [{"path": str(flat / ".cache" / "x.png"), "reason": "in a hidden folder (.cache)"}]


@pytest.mark.parametrize("content,error,words", [
    (None, MissingFileError, r"dataset.manifest=.*nowhere.csv is not a file: point it at a CSV .*path,label"),
    ("file,label\nimg/blue/blue_0.png,blue\n", ConfigError, r"has no 'path' column \(header: file,label\)"),
    ("path,label,split\nimg/blue/blue_0.png,blue,training\n", ConfigError,
     r"line 2: split 'training' is not one of train, val, test; fix the value, or drop the split column"),
    ("path,label\nimg/blue/blue_0.png,blue\nimg/blue/nope.png,blue\nimg/x.png,red\n", MissingFileError,
     r"line 3: .*nope.png is not a file \(and 1 more row\(s\)\); relative paths are relative to .*: fix the path"),
    ("path,label\nimg/blue/blue_0.png,\n", ConfigError, r"line 2: empty label"),
    ("path,label\nimg/blue/blue_0.png,blue\n./img/blue/blue_0.png,red\n", ConfigError,
     r"line 3: ./img/blue/blue_0.png is listed again \(first on line 2\); keep one row per file"),
    ("path,label\n", ConfigError, r"has no rows"),
])
def test_bad_manifest_is_a_one_line_error_naming_the_row_and_the_fix(tmp_path, content, error, words):
    write_flat(tmp_path / "img", per_class=1)
    path = tmp_path / "nowhere.csv"
    if content is not None:
        path = tmp_path / "bad.csv"
        path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=words) as e:
        read_manifest(str(path))
    assert "\n" not in str(e.value) and isinstance(e.value, PipelineError)


def test_layout_checks_at_start_up_on_flat_trees_and_manifests(tmp_path):
    flat = write_flat(tmp_path / "flat", per_class=1)
    layout = SplitLayout(train_split="train", val_split="val", val_fraction=0.2)
    with pytest.raises(ConfigError, match=r"Class folders in .*flat and only 3 train images for 3 classes: holding "
                                          r"out 3 val images"):
        check_layout(flat, layout, min_per_class=1)
    with pytest.raises(ConfigError, match=r"dataset.val_fraction=0.5 \+ dataset.test_fraction=0.5 leave no train"):
        check_layout(write_flat(tmp_path / "big"), replace(layout, val_fraction=0.5, test_fraction=0.5),
                     min_per_class=1)
    manifest = write_manifest(tmp_path / "m.csv", [(f"flat/{c}/{c}_0.png", c, "val") for c in CLASSES],
                              "path,label,split")
    with pytest.raises(ConfigError, match=r"has no train rows: mark rows split=train"):
        check_layout(tmp_path, replace(layout, manifest=str(manifest)), min_per_class=1)
    (tmp_path / "mixed" / "val" / "red").mkdir(parents=True)
    with pytest.raises(MissingFileError, match=r"has val/ but no train/ folder: expected .*/<class>/<image>"):
        check_layout(tmp_path / "mixed", layout, min_per_class=1)


def test_audit_and_preview_work_on_a_flat_tree_and_a_manifest(tmp_path, capsys):
    from pipeline import audit, preview

    flat = write_flat(tmp_path / "flat", per_class=6)
    audit.main(["dataset=folder", f"dataset.root={flat}", "backbone=tiny", f"out={tmp_path / 'audit'}"])
    assert (tmp_path / "audit" / "audit.json").is_file()
    rows = [(f"flat/{c}/{c}_{i}.png", c) for c in CLASSES for i in range(6)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "preview.png"
    preview.main(["dataset=folder", f"dataset.manifest={manifest}", "backbone=tiny", "n=4", f"out={out}"])
    assert out.is_file() and "3 classes" in capsys.readouterr().out
    bad = write_manifest(tmp_path / "bad.csv", [("flat/blue/blue_0.png", "blue", "holdout")], "path,label,split")
    with pytest.raises(SystemExit) as e:
        audit.main(["dataset=folder", f"dataset.manifest={bad}", f"out={tmp_path / 'audit2'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "line 2: split 'holdout'" in err
