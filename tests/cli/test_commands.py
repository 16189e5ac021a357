"""The entry points' one convention: `key=value` everywhere, the same on `make` and `python -m`, and every user
error one line on stderr (naming the thing and the fix) with exit code 2."""
from __future__ import annotations

import csv
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline
from conftest import ROOT
from pipeline.audit import main as audit_main
from pipeline.export import main as export_main
from pipeline.predict import main as predict_main
from pipeline.preview import main as preview_main
from pipeline.report import main as report_main
from pipeline.reports.preview_grid import grid_size


def one_line_error(capsys, info) -> str:
    """The exit code is 2 and stderr ends in exactly one `error: ...` line; returns that line."""
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0] and "Traceback" not in err, err
    return lines[0]


def make_command(target: str, *args: str) -> list[str]:
    """The command `make <target> args...` runs (from `make -n`), so the Makefile's own translation is tested."""
    proc = subprocess.run(["make", "-s", "-n", target, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    [line] = [ln for ln in proc.stdout.replace("\\\n", " ").splitlines() if f"-m pipeline.{target}" in ln]
    return shlex.split(line)[1:]  # drop the venv's python: run with this interpreter


# --- predict ---------------------------------------------------------------------------------------------------

def test_make_predict_reports_broken_image_and_predicts_the_rest(exported, folder, tmp_path):
    _, _, out = exported
    cmd = make_command("predict", f"RUN={out}", f"IMAGES={folder}", "TOPK=2", f"OUT={tmp_path / 'pred.csv'}")
    assert cmd[:2] == ["-m", "pipeline.predict"] and f"images={folder}" in cmd and "topk=2" in cmd
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    good = sorted(str(p) for p in folder.rglob("*.png"))
    expected = pipeline.load(out).predict(good, topk=2)
    printed = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert sorted(printed) == good
    for path, top in zip(good, expected):
        assert printed[path] == " | ".join(f"{name} {p:.3f}" for name, p in top)
    assert "broken.jpg: UNREADABLE" in proc.stderr and "3 image(s) predicted, 1 unreadable" in proc.stderr
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(good + [str(folder / "broken.jpg")])
    assert rows[str(folder / "broken.jpg")]["label_1"] == "" and rows[str(folder / "broken.jpg")]["error"]
    for path, top in zip(good, expected):
        assert [rows[path]["label_1"], rows[path]["label_2"]] == [top[0][0], top[1][0]]
        assert float(rows[path]["prob_1"]) == pytest.approx(top[0][1], abs=1e-6) and rows[path]["error"] == ""


def test_make_predict_cam_writes_the_overlays_into_cam_dir(exported, folder, tmp_path, capsys):
    _, _, out = exported
    cmd = make_command("predict", f"RUN={out}", f"IMAGES={folder}", "CAM=true", f"CAM_DIR={tmp_path / 'heat'}",
                       f"OUT={tmp_path / 'pred.csv'}")
    assert "cam=true" in cmd and f"cam_dir={tmp_path / 'heat'}" in cmd
    assert predict_main(cmd[2:]) == 0
    written = sorted(p.name for p in (tmp_path / "heat").glob("*.png"))
    assert written == ["0001_blue_1.png", "0003_red_0.png", "0004_green_2.png"]  # broken.jpg (2nd) has none
    assert capsys.readouterr().out.count("; cam: ") == 3


@pytest.mark.parametrize("args, message", [
    (["run={out}", "images={missing}"], "Image path not found"),
    (["run={out}", "images={broken_only}"], "None of the 1 images could be read"),
    (["run={out}", "images={folder}", "topk=0"], "topk=0 must be a positive integer"),
    (["run={out}", "images={folder}", "backend=tflite"], "backend='tflite' is not valid; choose one of: torch, onnx"),
    (["run={tampered}", "images={folder}"], "does not match the sha256 in model.json"),
    (["run={nothing}", "images={folder}"], "has no model.json (export dir) or best.json (run dir)"),
    (["run={out}", "images={folder}", "--topk", "2"], "'--topk' is not an option here: every argument is key=value"),
    (["images={folder}"], "predict needs run=...: e.g. run=outputs/runs/<run>/export"),
    (["run={out}"], "predict needs images=..."),
    (["run={out}", "images={folder}", "trainer.epochs=3"], "predict: unknown argument(s) ['trainer.epochs=3']"),
    (["run={out}", "images={folder}", "cam=yes"], "cam='yes' is not valid; choose one of: true, false"),
    (["run={out}", "images={folder}", "cam=true", "backend=onnx"], "cam=true needs backend=torch"),
    (["run={out}", "images={folder}", "cam_dir={folder}"], "holds files the pipeline did not write"),
])
def test_predict_user_errors_are_one_line_with_exit_code_2(exported, folder, tmp_path, capsys, args, message):
    _, _, out = exported
    tampered = Path(shutil.copytree(out, tmp_path / "tampered"))
    blob = bytearray((tampered / "model.safetensors").read_bytes())
    blob[-5] ^= 0x01
    (tampered / "model.safetensors").write_bytes(bytes(blob))
    (tmp_path / "broken_only").mkdir()
    (tmp_path / "broken_only" / "x.png").write_bytes(b"")
    (tmp_path / "nothing").mkdir()
    paths = {"out": out, "missing": tmp_path / "missing.jpg", "broken_only": tmp_path / "broken_only",
             "folder": folder, "tampered": tampered, "nothing": tmp_path / "nothing"}
    argv = [a.format(**paths) for a in args] + [f"csv={tmp_path / 'p.csv'}"]
    with pytest.raises(SystemExit) as info:
        predict_main(argv)
    assert message in one_line_error(capsys, info)


# --- export ----------------------------------------------------------------------------------------------------

def test_make_export_takes_run_and_export_overrides(exported, tmp_path):
    """`make export RUN=r export.opset=18` (the case the old argparse CLI refused) exports with opset 18."""
    _, run, _ = exported
    cmd = make_command("export", f"RUN={run}", f"OUT={tmp_path / 'exp'}", "export.opset=18",
                       "export.formats=[onnx]", "export.int8=false")
    assert "export.opset=18" in cmd and f"run={run}" in cmd
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "exp" / "model.json").read_text())
    assert doc["onnx"]["opset"] == 18 and sorted(doc["files"]) == ["model.onnx", "model.safetensors"]
    assert "int8" not in doc  # export.int8=false from the command line: a YAML false, not the string


def test_corrupt_best_json_is_a_one_line_error(exported, tmp_path, capsys):
    """Weights without the JSON committed in their header (older runs): a damaged best.json cannot be put right."""
    from safetensors.torch import load_file, save_file

    _, run, _ = exported
    broken = Path(shutil.copytree(run, tmp_path / "run"))
    save_file(load_file(broken / "best.safetensors"), broken / "best.safetensors")  # no header JSON
    (broken / "best.json").write_text('{"arch": "test_efficientnet", "num_cla')
    with pytest.raises(SystemExit) as info:
        export_main([f"run={broken}", f"out={tmp_path / 'out'}"])
    line = one_line_error(capsys, info)
    assert "best.json is not valid JSON" in line and "re-run training" in line
    assert not (tmp_path / "out").exists()


def test_a_best_json_left_behind_by_a_kill_is_rewritten_from_its_weights(exported, tmp_path):
    _, run, _ = exported
    behind = Path(shutil.copytree(run, tmp_path / "run"))
    (behind / "best.json").write_text('{"arch": "test_efficientnet", "num_cla')  # the kill came mid-copy
    export_main([f"run={behind}", f"out={tmp_path / 'out'}"])
    assert json.loads((behind / "best.json").read_text()) == json.loads((run / "best.json").read_text())
    assert (tmp_path / "out" / "model.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["run={no_run}"], "no_run has no best.json"),
    (["run={run}", "export.tolerance=-1"], "export.tolerance=-1 must be >= 0.0"),
    (["run={run}", "export.formats=[tflite]"], "export.formats='tflite' is not valid; choose one of"),
    (["run={run}", "export.opsett=18"], "export has no setting(s) ['opsett']"),
    (["run={run}", "--opset", "18"], "'--opset' is not an option here: every argument is key=value (e.g. opset=...)"),
    (["run={run}", "trainer.epochs=2"], "export: unknown argument(s) ['trainer.epochs=2']"),
    ([], "export needs run=...: e.g. run=outputs/runs/<date>_<dataset>"),
])
def test_export_user_errors_are_one_line_with_exit_code_2(exported, tmp_path, capsys, args, message):
    _, run, _ = exported
    argv = [a.format(run=run, no_run=tmp_path / "no_run") for a in args] + [f"out={tmp_path / 'out'}"]
    with pytest.raises(SystemExit) as info:
        export_main(argv)
    assert message in one_line_error(capsys, info)


# --- audit and preview -----------------------------------------------------------------------------------------

def test_audit_writes_json_and_markdown(tiny_folder, tmp_path, capsys):
    shutil.copy(tiny_folder / "train/red/red_0.png", tiny_folder / "val/red/leak.png")
    out = tmp_path / "audit_out"
    audit_main([f"out={out}", "dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny"])
    printed = capsys.readouterr().out
    report = json.loads((out / "audit.json").read_text())
    assert report["summary"]["eval_files_leaked"] == 1 and report["dataset"] == "folder"
    assert (out / "audit.md").read_text().startswith("## Data audit") and "DATA LEAKAGE" in printed


def test_preview_writes_a_grid_png_of_the_expected_size(tiny_folder, tmp_path, capsys):
    out = tmp_path / "preview.png"
    preview_main(["n=5", f"out={out}", "dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny",
                  "augment=heavy", "backbone.input_size=64"])
    assert "Wrote" in capsys.readouterr().out
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape[1::-1] == grid_size(5, 64) == (3 * 66 + 2, 2 * (64 + 14 + 2) + 2)
    tile = sheet[2 + 14:2 + 14 + 64, 2:2 + 64]
    assert tile.std() > 5 and not (tile == 255).all()  # a real augmented image was pasted, not blank paper


@pytest.mark.parametrize("command, args, message", [
    (audit_main, ["dataset.rooot=x"], "Could not override 'dataset.rooot'"),
    (audit_main, ["--out", "x"], "'--out' is not an option here: every argument is key=value (e.g. out=...)"),
    (audit_main, ["dataset.dedup=all"], "dataset.dedup='all' is not valid; choose one of: none, drop_from_eval"),
    (preview_main, ["augment.scal_min=0.3"], "Could not override 'augment.scal_min'"),
    (preview_main, ["n=0"], "preview: n=0 must be a positive integer"),
    (preview_main, ["augment.scale_min=0"], "augment.scale_min=0.0 must be in [0.001, 1] (e.g. augment.scale_min=0.5)"),
    (preview_main, ["augment=haevy"], "Could not find 'augment/haevy'"),
])
def test_audit_and_preview_user_errors_are_one_line(tiny_folder, tmp_path, capsys, command, args, message):
    with pytest.raises(SystemExit) as info:
        command(["dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", f"out={tmp_path / 'o'}", *args])
    assert message in one_line_error(capsys, info)


# --- report ----------------------------------------------------------------------------------------------------

def test_report_missing_or_empty_sweep_dir_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        report_main([f"sweep={tmp_path / 'nope'}"])
    assert "Sweep dir" in one_line_error(capsys, info) and not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        report_main([f"sweep={tmp_path / 'empty'}"])
    assert "No runs in" in one_line_error(capsys, info)
    with pytest.raises(SystemExit) as info:
        report_main([f"sweep={tmp_path / 'empty'}", "plot=maybe"])
    assert "plot='maybe' is not valid; choose one of: true, false" in one_line_error(capsys, info)


# --- train -----------------------------------------------------------------------------------------------------

def run_train(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_freeze_depth_out_of_range_fails_before_any_data_is_read(tiny_folder, tmp_path):
    """strategy.freeze_depth=99 is checked against the backbone's layer groups at start-up, before the data probe,
    the audit and the model build: the run dir holds no audit and no checkpoint."""
    run = tmp_path / "run"
    proc = run_train("dataset=folder", f"dataset.root={tiny_folder}", "backbone=tiny", "trainer=smoke",
                     "strategy=partial", "strategy.freeze_depth=99", f"output_dir={run}", f"data_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: strategy.freeze_depth=99 is out of range")
    assert "Traceback" not in proc.stderr and "probed" not in proc.stderr
    assert not (run / "audit.json").exists() and not (run / "best.json").exists()


@pytest.mark.parametrize("args, message", [
    (["trainer.epocs=3"], "error: Could not override 'trainer.epocs'"),
    (["strategy=parital"], "error: Could not find 'strategy/parital'"),
    (["trainer.device=gpu"], "error: trainer.device='gpu' is not valid; choose one of: auto, cpu, cuda"),
    (["dataset=folder", "dataset.root=/nowhere/at/all"], "error: Dataset 'folder' not found at /nowhere/at/all"),
])
def test_train_user_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    proc = run_train(*args, "trainer=smoke", f"output_dir={tmp_path / 'run'}", f"data_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(message) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
