"""`make audit` (pipeline/audit.py): the trust checks' sections, sheets and keys in its output dir."""
from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from pipeline.audit import main as audit_main


def test_audit_writes_sheets_and_trust_sections(tiny_folder, tmp_path, capsys):
    Image.open(tiny_folder / "train/green/green_3.png").save(tiny_folder / "val/green/copy.jpg", quality=80)
    for k, (true, given) in enumerate((("red", "blue"), ("blue", "green"), ("green", "red"))):
        shutil.move(tiny_folder / f"train/{true}/{true}_{k}.png", tiny_folder / f"train/{given}/was_{true}.png")
    out = tmp_path / "audit_out"
    audit_main([f"out={out}", "dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny",
                "backbone.input_size=32", f"features.cache_dir={tmp_path / 'features'}"])
    printed = capsys.readouterr().out
    report = json.loads((out / "audit.json").read_text())
    pairs = report["near_duplicates"]["pairs"]
    assert [p["files"][1]["path"].rsplit("/", 1)[1] for p in pairs] == ["copy.jpg"]
    assert report["shortcuts"]["flagged"] is False and "skill" in report["shortcuts"]["classifier"]
    flagged = {c["path"].rsplit("/", 1)[1] for c in report["label_issues"]["candidates"]}
    assert {"was_red.png", "was_blue.png", "was_green.png"} <= flagged
    text = (out / "audit.md").read_text()
    for section in ("## Data audit", "**Near-duplicates across splits", "### Storage shortcuts",
                    "### Label-error candidates", "`was_red.png`"):
        assert section in text
    for sheet in ("near_duplicates.png", "label_issues.png"):
        pixels = np.asarray(Image.open(out / sheet).convert("RGB"))
        assert pixels.std() > 10 and sheet in printed  # real thumbnails, not a blank sheet
