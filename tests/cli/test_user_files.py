"""Every command pointed at a folder of the user's leaves every file in it byte-identical (issue: a forgotten
`dataset=folder` once deleted a photo folder). Each case is the command a user could mistype, with the arguments
they would type.

How each case runs: `pipeline.train` and `pipeline.rank` as `python -m` subprocesses (their guards act on the run
dir Hydra's `@hydra.main` resolves, and Hydra's job logging and run-dir state must not leak into the test
session); `pipeline.predict` too, so one non-train command is covered end to end through its real CLI (the
process's stderr and exit code). `export`, `audit`, `preview` and `report` call their `main(argv)` in-process,
as tests/cli/test_commands.py does: the same guard, the same one `error:` line, the same exit code 2, no
interpreter start-up."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import make_imagefolder, write_image
from pipeline.audit import main as audit_main
from pipeline.export import main as export_main
from pipeline.preview import main as preview_main
from pipeline.report import main as report_main

PHOTO = "cats/my_photo.jpg"
IN_PROCESS = {"pipeline.export": export_main, "pipeline.audit": audit_main, "pipeline.preview": preview_main,
              "pipeline.report": report_main}  # every other module runs as `python -m` (see the docstring)


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


def run_in_process(module: str, args: list[str], capsys) -> subprocess.CompletedProcess:
    """`module`'s main(args) in this process, its exit code and output as `run` reports a subprocess's."""
    capsys.readouterr()  # start from empty captures
    try:
        code = IN_PROCESS[module](args)
    except SystemExit as e:  # exit_on_user_error: one `error:` line on stderr, then SystemExit(2)
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code or 0, out, err)


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2 and one `error:` line that names the fix; no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith("error: ") and all(w in err.splitlines()[-1] for w in words), err[-3000:]


TINY = ["backbone=tiny", "trainer.epochs=1", "trainer.num_workers=0", "audit.label_issues=false"]


# The user's folders that are more than a photo and files named like the command's outputs.

def loose_photo_beside_an_archive(tmp: Path, exported) -> Path:  # no class folders; {tmp}/classes.tar has some
    with tarfile.open(tmp / "classes.tar", "w") as t:
        t.add(exported[0] / "train", arcname="train")
    return user_folder(tmp, "notes.txt", classes=False)


def finished_run(tmp: Path, exported) -> Path:  # a finished run's dir, given as hydra.run.dir again
    return Path(shutil.copytree(exported[1], tmp / "mine"))


def one_sweep_job_beside_own_reports(tmp: Path, exported) -> Path:
    mine = user_folder(tmp, "report.md", "report.csv")
    shutil.copytree(exported[1], mine / "0_job", ignore=shutil.ignore_patterns("*.safetensors", "*.pt"))
    return mine


@dataclass(frozen=True)
class Case:
    module: str
    args: list[str]  # {mine}: the user's folder; {tmp}: the test's dir; {data}, {run}, {export}: `exported`'s
    fix: tuple[str, ...]  # words the one `error:` line must name
    outputs: tuple[str, ...] = ()  # files in the user's folder named like the command's outputs
    folder: Callable[[Path, tuple], Path] | None = None  # makes the user's folder instead of user_folder(outputs)


CASES = {
    # the default dataset generates digits into dataset.root
    "train_digits_root": Case("pipeline.train", ["dataset.root={mine}"], ("dataset=folder",)),
    "train_download_root": Case("pipeline.train", [
        "dataset=folder", "dataset.root={mine}", "dataset.download=true", "dataset.url=file://{tmp}/classes.tar",
        *TINY], ("point it at a new dir",), folder=loose_photo_beside_an_archive),
    "train_output_dir": Case("pipeline.train", ["dataset=folder", "dataset.root={data}", "output_dir={mine}", *TINY],
                             ("holds a run", "trainer.resume="), outputs=("config.yaml", "summary.md")),
    "train_finished_run_dir": Case("pipeline.train", [
        "dataset=folder", "dataset.root={data}", "hydra.run.dir={mine}", *TINY],
        ("already holds a run", "trainer.resume="), folder=finished_run),
    "export_out": Case("pipeline.export", ["run={run}", "out={mine}"], ("choose another out=",),
                       outputs=("model.json", "MODEL_CARD.md")),
    "audit_out": Case("pipeline.audit", ["dataset=folder", "dataset.root={data}", "audit.label_issues=false",
                                         "out={mine}"], ("choose another out=",), outputs=("audit.json", "audit.md")),
    "preview_out": Case("pipeline.preview", ["dataset=folder", "dataset.root={data}", "backbone=tiny",
                                             "out={mine}/preview.png"], ("choose another out=",),
                        outputs=("preview.png",)),
    "rank_dir": Case("pipeline.rank", ["dataset=folder", "dataset.root={data}", "backbone=tiny",
                                       "hydra.run.dir={mine}"], ("choose a new dir",),
                     outputs=("rank.md", "rank.json")),
    "report_sweep": Case("pipeline.report", ["sweep={mine}"], ("choose another out=",),
                         folder=one_sweep_job_beside_own_reports),
    "predict_csv": Case("pipeline.predict", ["run={export}", "images={mine}", "csv={mine}/predictions.csv"],
                        ("choose another csv=",), outputs=("predictions.csv",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_command_pointed_at_the_users_folder_is_refused_and_changes_nothing(name, tmp_path, exported, capsys,
                                                                              monkeypatch):
    case = CASES[name]
    mine = case.folder(tmp_path, exported) if case.folder else user_folder(tmp_path, *case.outputs)
    paths = {"mine": mine, "tmp": tmp_path, "data": exported[0], "run": exported[1], "export": exported[2]}
    args = [a.format(**paths) for a in case.args]
    before = snapshot(mine)
    if case.module in IN_PROCESS:
        monkeypatch.chdir(tmp_path)  # where the subprocesses run: a relative default lands in tmp, not the repo
        proc = run_in_process(case.module, args, capsys)
    else:
        proc = run(args, tmp_path, case.module)
    refused(proc, *case.fix)
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
