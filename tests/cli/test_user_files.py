"""Every command pointed at a folder of the user's leaves every file in it byte-identical (issue: a forgotten
`dataset=folder` once deleted a photo folder). Each case is the command a user could mistype, run as they run it."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import make_imagefolder, write_image

PHOTO = "cats/my_photo.jpg"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(root: Path, *outputs: str, classes: bool = True) -> Path:
    """A folder of the user's: a real photo (in a class folder, or loose) and files named like a command's outputs."""
    folder = root / "mine"
    write_image(folder / (PHOTO if classes else "my_photo.jpg"), (120, 80, 40), fmt="JPEG")
    for name in outputs:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"the user's own {name}\n")
    return folder


def run(args: list[str], cwd: Path, module: str = "pipeline.train") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2 and one `error:` line that names the fix; no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith("error: ") and all(w in err.splitlines()[-1] for w in words), err[-3000:]


TINY = ["backbone=tiny", "trainer.epochs=1", "trainer.num_workers=0", "audit.label_issues=false"]


def case_train_digits_root(tmp: Path, exported):  # the default dataset generates digits into dataset.root
    return user_folder(tmp), "pipeline.train", [f"dataset.root={{mine}}"], ("dataset=folder",)


def case_train_download_root(tmp: Path, exported):  # dataset.download into a folder with no class folders
    archive = tmp / "classes.tar"
    with tarfile.open(archive, "w") as t:
        t.add(exported[0] / "train", arcname="train")
    return user_folder(tmp, "notes.txt", classes=False), "pipeline.train", [
        "dataset=folder", "dataset.root={mine}", "dataset.download=true", f"dataset.url=file://{archive}", *TINY], \
        ("point it at a new dir",)


def case_train_output_dir(tmp: Path, exported):
    return user_folder(tmp, "config.yaml", "summary.md"), "pipeline.train", [
        "dataset=folder", f"dataset.root={exported[0]}", "output_dir={mine}", *TINY], ("holds a run", "trainer.resume=")


def case_train_finished_run_dir(tmp: Path, exported):  # hydra.run.dir of a finished run, again
    finished = tmp / "mine"
    shutil.copytree(exported[1], finished)
    return finished, "pipeline.train", ["dataset=folder", f"dataset.root={exported[0]}", "hydra.run.dir={mine}",
                                        *TINY], ("already holds a run", "trainer.resume=")


def case_export_out(tmp: Path, exported):
    return user_folder(tmp, "model.json", "MODEL_CARD.md"), "pipeline.export", [f"run={exported[1]}", "out={mine}"], \
        ("choose another out=",)


def case_audit_out(tmp: Path, exported):
    return user_folder(tmp, "audit.json", "audit.md"), "pipeline.audit", [
        "dataset=folder", f"dataset.root={exported[0]}", "audit.label_issues=false", "out={mine}"], \
        ("choose another out=",)


def case_preview_out(tmp: Path, exported):
    return user_folder(tmp, "preview.png"), "pipeline.preview", [
        "dataset=folder", f"dataset.root={exported[0]}", "backbone=tiny", "out={mine}/preview.png"], \
        ("choose another out=",)


def case_rank_dir(tmp: Path, exported):
    return user_folder(tmp, "rank.md", "rank.json"), "pipeline.rank", [
        "dataset=folder", f"dataset.root={exported[0]}", "backbone=tiny", "hydra.run.dir={mine}"], \
        ("choose a new dir",)


def case_report_sweep(tmp: Path, exported):
    mine = user_folder(tmp, "report.md", "report.csv")
    shutil.copytree(exported[1], mine / "0_job", ignore=shutil.ignore_patterns("*.safetensors", "*.pt"))
    return mine, "pipeline.report", ["sweep={mine}"], ("choose another out=",)


def case_predict_csv(tmp: Path, exported):
    return user_folder(tmp, "predictions.csv"), "pipeline.predict", [
        f"run={exported[2]}", "images={mine}", "csv={mine}/predictions.csv"], ("choose another csv=",)


CASES = {name.removeprefix("case_"): fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_command_pointed_at_the_users_folder_is_refused_and_changes_nothing(name, tmp_path, exported):
    mine, module, args, fix_words = CASES[name](tmp_path, exported)
    before = snapshot(mine)
    proc = run([a.replace("{mine}", str(mine)) for a in args], tmp_path, module)
    refused(proc, *fix_words)
    assert snapshot(mine) == before  # byte-identical, nothing deleted, nothing added


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "manifest"])
def test_training_on_the_users_folder_reads_it_and_writes_nothing_there(source, tmp_path):
    mine = user_folder(tmp_path, "notes.txt")
    make_imagefolder(mine, {"blue": 6, "red": 6}, split="")  # class folders at the top, beside the user's cats/
    write_image(mine / "cats" / "another.jpg", (110, 90, 30), seed=3, fmt="JPEG")
    if source == "manifest":
        rows = [f"{p.relative_to(mine)},{p.parent.name}" for p in sorted(mine.rglob("*.*")) if p.suffix != ".txt"]
        (mine / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    where = [f"dataset.manifest={mine / 'labels.csv'}"] if source == "manifest" else [f"dataset.root={mine}"]
    before = snapshot(mine)
    proc = run(["dataset=folder", *where, f"output_dir={tmp_path / 'run'}", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(mine) == before
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_a_sweep_into_the_users_folder_adds_its_jobs_and_overwrites_nothing(tmp_path, exported):
    mine = user_folder(tmp_path, "report.md", "multirun.yaml.bak")
    before = snapshot(mine)
    proc = run(["--multirun", "dataset=folder", f"dataset.root={exported[0]}", f"hydra.sweep.dir={mine}",
                "seed=1", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = snapshot(mine)
    assert {k: after[k] for k in before} == before  # the user's report.md is not the sweep's report
    assert any(k.endswith("metrics.json") for k in after)  # the job ran, in a subdir of its own
