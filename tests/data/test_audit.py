"""Dataset audit: planted duplicates, leakage, label conflicts, odd files; dedup; training output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from conftest import compose_cfg, make_imagefolder
from pipeline.data.data_audit import audit_dataset, run_audit
from pipeline.data.folder import SplitLayout, load_imagefolder
from pipeline.reports.audit_report import audit_markdown


def _planted(tmp_path: Path) -> Path:
    """train/val/test folders with every defect the audit looks for, each planted once."""
    root = make_imagefolder(tmp_path / "ds", {"blue": 6, "red": 6}, "train")
    make_imagefolder(root, {"blue": 3, "red": 3}, "val", offset=500)
    make_imagefolder(root, {"blue": 2, "red": 2}, "test", offset=900)
    shutil.copy(root / "train/blue/blue_0.png", root / "val/blue/leaked.png")  # cross-split (leak)
    shutil.copy(root / "train/red/red_1.png", root / "test/red/leaked_too.png")  # cross-split (leak)
    shutil.copy(root / "train/red/red_2.png", root / "train/red/copy.png")  # within train
    shutil.copy(root / "train/blue/blue_3.png", root / "train/red/wrong_label.png")  # same file, two labels
    Image.new("RGB", (40, 40), (200, 200, 200)).save(root / "train/red/placeholder.png")  # one colour
    Image.open(root / "train/red/red_4.png").rotate(90).save(root / "train/red/really_png.jpg", format="PNG")
    Image.new("P", (40, 40), 3).save(root / "train/blue/palette.png")
    (root / "train/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train/blue/broken.jpg").write_bytes(b"<html>404</html>")
    return root


def test_audit_finds_planted_duplicates_leakage_and_odd_files(tmp_path):
    root = _planted(tmp_path)
    data = load_imagefolder(root)
    report = audit_dataset(data, name="planted", root=root, min_side=64)
    s = report["summary"]
    assert s["cross_split_groups"] == 2 and s["eval_files_leaked"] == 2
    leaked = {Path(f["path"]).name for g in report["duplicates"]["cross_split"] for f in g["files"]}
    assert {"leaked.png", "blue_0.png", "leaked_too.png", "red_1.png"} == leaked
    conflicts = report["duplicates"]["label_conflicts"]
    assert len(conflicts) == 1 and {f["class"] for f in conflicts[0]["files"]} == {"blue", "red"}
    assert s["within_split_groups"] == 2  # red_2 + copy, and blue_3 + wrong_label (both in train)
    assert [Path(m["path"]).name for m in report["extension_mismatch"]] == ["really_png.jpg"]
    assert [Path(m["path"]).name for m in report["few_colors"]] == ["palette.png", "placeholder.png"]
    assert [m["mode"] for m in report["odd_modes"]] == ["P"]
    assert [Path(p).name for p in report["stray_files"]] == [".DS_Store"]
    assert s["unreadable"] == 1 and report["splits"]["train"]["short_side_below_input"]["count"] == 17
    assert report["splits"]["val"]["per_class"] == {"blue": 4, "red": 3}
    assert any(w.startswith("DATA LEAKAGE: 2 val/test file(s)") and "dataset.dedup=drop_from_eval" in w
               for w in report["warnings"])
    text = "\n".join(audit_markdown(report))
    assert "## Data audit" in text and "`val/blue/leaked.png`" in text and "LABEL CONFLICT" in text


def test_dedup_drop_from_eval_removes_leaked_files_only(tmp_path):
    root = _planted(tmp_path)
    data = load_imagefolder(root)
    checks = compose_cfg().audit
    kept, report = run_audit(data, name="planted", root=root, dedup="drop_from_eval", checks=checks, seed=0)
    assert len(kept.val) == len(data.val) - 1 and len(kept.test) == len(data.test) - 1
    assert not any(p.endswith(("leaked.png", "leaked_too.png")) for p in kept.val.paths + kept.test.paths)
    assert kept.train.paths == data.train.paths
    assert report["dedup"]["mode"] == "drop_from_eval" and len(report["dedup"]["dropped"]) == 2
    _, warn_only = run_audit(data, name="planted", root=root, dedup="none", checks=checks, seed=0)
    assert warn_only["dedup"]["dropped"] == [] and len(data.val) == 7


def test_auto_val_split_keeps_identical_files_on_one_side(tmp_path):
    root = make_imagefolder(tmp_path / "ds", {"blue": 10, "red": 10}, "train")
    for i in range(5):  # five duplicated pairs: a plain split would put some pairs across train/val
        shutil.copy(root / f"train/blue/blue_{i}.png", root / f"train/blue/dup_{i}.png")
    data = load_imagefolder(root, SplitLayout(val_fraction=0.4), seed=0)
    report = audit_dataset(data, root=root)
    assert report["summary"]["cross_split_groups"] == 0 and report["summary"]["within_split_groups"] == 5
    assert len(data.val) + len(data.train) == 25


def test_training_writes_audit_and_drops_leaks(tmp_path, cfg_factory):
    root = make_imagefolder(tmp_path / "ds", {"blue": 6, "red": 6}, "train")
    make_imagefolder(root, {"blue": 2, "red": 2}, "val", offset=500)
    shutil.copy(root / "train/red/red_0.png", root / "val/red/leak.png")
    Image.open(root / "train/blue/blue_1.png").save(root / "val/blue/near.jpg", quality=75)  # re-encoded copy
    cfg = cfg_factory("dataset=folder", f"dataset.root={root}", "backbone=tiny", "backbone.input_size=32",
                      "dataset.dedup=drop_near_from_eval", "trainer.epochs=1", "strategy=finetune",
                      "audit.label_issues=true")
    from pipeline.train import train
    metrics = train(cfg)
    run = Path(cfg.output_dir)
    saved = json.loads((run / "audit.json").read_text())
    assert sorted(Path(p).name for p in saved["dedup"]["dropped"]) == ["leak.png", "near.jpg"]
    assert saved["label_issues"]["images"] == 16 and "candidates" in saved["label_issues"]
    assert metrics["audit"]["eval_files_leaked"] == 1 and metrics["audit"]["eval_files_near_leaked"] == 1
    summary = (run / "summary.md").read_text()
    assert "## Data audit" in summary and "DATA LEAKAGE" in summary and "| red | 6 | 2 |" in summary
    assert "### Storage shortcuts" in summary and "### Label-error candidates" in summary
    assert "- class pairs (" in summary and metrics["audit"]["confound_pairs"] == 0  # classes under pair_min_images
    assert "`train/blue/blue_1.png` ~ `val/blue/near.jpg`" in summary and (run / "near_duplicates.png").is_file()
    assert metrics["skipped_at_runtime"] == 0
