"""Fault injection (`make chaos`): real processes, real kills, a real full or read-only disk, hostile files.

Every scenario runs the real commands (`python -m pipeline.train ...`, tiny backbone) in a scratch dir of its
own, next to a folder of "the user's" (the dataset, with a file of theirs beside the images) and then checks:
- runs consistent: each run dir left behind is one a user can trust and continue. Its JSON files parse,
  `best` loads with the JSON committed beside its weights, `last.pt` loads, and a killed run resumed with
  `trainer.resume=<dir>` (or a new run, where it died before its first `last.pt`) finishes with status ok
  and leaves no temp file behind;
- user files lost: files of the user's folder deleted or changed (sha256 before and after);
- tracebacks: any "Traceback" on a command's stderr (a fault must end in a one-line error or a reported skip).

Faults: kill -9 at random points (fine-tune path and cached-features path), 3 concurrent runs, a resume racing
a live run, a full disk (a small tmpfs where one can be mounted, else ENOSPC injected at the os layer:
bench/chaos_inject.py), a read-only output dir (a read-only tmpfs, else EROFS injected), and bomb files (a
60000 x 1 PNG strip, a decompression bomb, a 16-bit PNG, a 0-byte and a truncated file) beside real images,
plus an export whose model.json asks for a 100000 x 100000 input.

Prints a table and writes outputs/chaos/chaos.json; exits 1 when anything is lost, inconsistent or a traceback.
`--kills N` sets the number of kill -9 runs (default 20, half per path).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.model import checkpoint  # noqa: E402
from pipeline.runtime.files import _SCRATCH  # noqa: E402 - the temp-name pattern the writer uses

TINY = ["backbone=tiny", "trainer.num_workers=0", "audit.label_issues=false", "trainer.progress=false"]
PATHS = {"finetune": ["strategy=finetune", "trainer.epochs=6"],
         "cached": ["strategy=linear_probe", "features.cached=true", "trainer.epochs=6"]}


def write_images(root: Path, per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for c, color in {"blue": (20, 40, 200), "red": (200, 30, 30)}.items():
        for i in range(per_class):
            arr = np.clip(np.array(color) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / c / f"{c}_{i}.png")
    (root / "README.txt").write_text("my own notes, beside my images\n")  # a file of the user's
    return root


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def lost(before: dict[str, str], folder: Path) -> int:
    after = snapshot(folder)
    return sum(after.get(k) != v for k, v in before.items())


class Tally:
    """One table row: faults injected, runs checked and consistent, user files lost, tracebacks."""

    def __init__(self, name: str):
        self.row = {"fault": name, "injected": 0, "runs": 0, "consistent": 0, "lost": 0, "tracebacks": 0,
                    "notes": []}

    def command(self, proc: subprocess.CompletedProcess | tuple) -> None:
        err = proc.stderr if hasattr(proc, "stderr") else proc[1]
        if "Traceback" in (err or ""):
            self.row["tracebacks"] += 1
            self.row["notes"].append((err or "")[-600:])

    def run_dir(self, problems: list[str], where: Path) -> None:
        self.row["runs"] += 1
        self.row["consistent"] += not problems
        if problems:
            self.row["notes"].append(f"{where}: {'; '.join(problems)}")


def train(args: list[str], cwd: Path, inject: list[str] | None = None, timeout: int = 600):
    head = [sys.executable, str(ROOT / "bench" / "chaos_inject.py"), *inject] if inject else [sys.executable]
    return subprocess.run([*head, "-m", "pipeline.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def check_run_dir(run: Path, finished: bool) -> list[str]:
    """What is wrong with `run` as a user would find it (empty list: consistent)."""
    problems = []
    for p in run.glob("*.json"):
        try:
            json.loads(p.read_text())
        except ValueError:
            problems.append(f"{p.name} is not valid JSON")
    if (run / "best.safetensors").exists():
        try:
            _, meta = checkpoint.load_checkpoint(run, "best")
            if meta != checkpoint.embedded_meta(run / "best.safetensors"):
                problems.append("best.json disagrees with the weights")
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"best does not load: {str(e)[:200]}")
    if (run / checkpoint.LAST).exists():
        try:
            checkpoint.load_state(run / checkpoint.LAST)
        except Exception as e:  # noqa: BLE001
            problems.append(f"last.pt does not load: {str(e)[:200]}")
    if finished:
        status = json.loads((run / "metrics.json").read_text()).get("status") if (run / "metrics.json").exists() \
            else None
        if status != "ok":
            problems.append(f"metrics.json status {status}")
        temps = [p.name for p in run.iterdir() if _SCRATCH.match(p.name)]
        if temps:
            problems.append(f"temp files left: {temps[:3]}")
    return problems


def base_args(data: Path, work: Path, path: str = "finetune") -> list[str]:
    return ["dataset=folder", f"dataset.root={data}", f"data_dir={work / 'data'}", *TINY, *PATHS[path]]


def finish_as_a_user_would(run: Path, data: Path, work: Path, path: str, tally: Tally) -> list[str]:
    """Resume the killed run (or, killed before its first last.pt, start again in a new dir); what is wrong."""
    if (run / "metrics.json").exists():
        return check_run_dir(run, finished=True)  # it had finished before the kill
    if (run / checkpoint.LAST).exists():
        proc, final = train([f"trainer.resume={run}", "trainer.progress=false"], work), run
    else:
        final = run.with_name(run.name + "_again")
        proc = train([*base_args(data, work, path), f"output_dir={final}"], work)
    tally.command(proc)
    problems = check_run_dir(final, finished=True)
    return problems + ([f"continuing exited {proc.returncode}: {proc.stderr.strip()[-300:]}"] if proc.returncode
                       else [])


def kill_runs(work: Path, data: Path, path: str, n: int, rng: random.Random) -> dict:
    tally = Tally(f"kill -9 ({path} path)")
    before = snapshot(data)
    start = time.perf_counter()
    first = train([*base_args(data, work, path), f"output_dir={work / f'{path}_whole'}"], work)
    seconds = time.perf_counter() - start
    tally.command(first)
    tally.run_dir(check_run_dir(work / f"{path}_whole", finished=True), work / f"{path}_whole")
    for i in range(n):
        run = work / f"{path}_kill_{i}"
        cmd = [sys.executable, "-m", "pipeline.train", *base_args(data, work, path), f"output_dir={run}"]
        proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=_env())
        try:
            proc.communicate(timeout=rng.uniform(0.2, 0.9) * seconds)  # before the end: start-up included
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            tally.row["injected"] += 1
        problems = check_run_dir(run, finished=False) if run.exists() else []
        problems += finish_as_a_user_would(run, data, work, path, tally)
        problems += [f"temp file left in a cache: {p.name}" for p in (work / "data").rglob("*") if _SCRATCH.match(p.name)]
        tally.run_dir(problems, run)
    tally.row["lost"] = lost(before, data)
    tally.row["notes"].insert(0, f"an uninterrupted run takes {seconds:.0f} s")
    return tally.row


def concurrent_runs(work: Path, data: Path) -> dict:
    tally = Tally("3 concurrent runs")
    before, cwd = snapshot(data), work / "concurrent"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "pipeline.train", *base_args(data, work)]
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(3)]
    for p in procs:
        tally.command((None, p.communicate()[1]))
    tally.row["injected"] = 3
    runs = sorted((cwd / "outputs" / "runs").iterdir())
    for run in runs:
        tally.run_dir(check_run_dir(run, finished=True), run)
    if len(runs) != 3:
        tally.run_dir([f"{len(runs)} run dirs for 3 runs"], cwd)
    tally.row["lost"] = lost(before, data)
    return tally.row


def resume_race(work: Path, data: Path) -> dict:
    """While a run trains: `trainer.resume=<its dir>` is refused, `trainer.resume=auto` passes over it."""
    tally = Tally("resume racing a live run")
    before, cwd = snapshot(data), work / "race"
    cwd.mkdir()
    args = [a for a in base_args(data, work) if not a.startswith("trainer.epochs")]
    live = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args, "trainer.epochs=40",
                             "trainer.early_stop_patience=0"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    while not list(cwd.glob(f"outputs/runs/*/{checkpoint.LAST}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    run = next(cwd.glob(f"outputs/runs/*/{checkpoint.LAST}")).parent
    auto = train([*args, "trainer.epochs=1", "trainer.resume=auto"], cwd)
    joined = train([f"trainer.resume={run}"], cwd)
    if live.poll() is not None:
        tally.row["notes"].append("the live run ended before both racers had run: raise its epochs")
    tally.row["injected"] = 2
    for proc, expect in ((joined, "still training"), (auto, "passing over")):
        tally.command(proc)
        ok = (proc.returncode == 2 and expect in proc.stderr.splitlines()[-1]) if expect == "still training" \
            else (proc.returncode == 0 and expect in proc.stdout + proc.stderr)
        if not ok:
            tally.row["notes"].append(f"expected '{expect}': exit {proc.returncode} {proc.stderr.strip()[-300:]}")
    tally.command((None, live.communicate()[1]))
    tally.run_dir(check_run_dir(run, finished=True) + ([] if joined.returncode == 2 and auto.returncode == 0 else
                                                      ["the racing resume was not refused / passed over"]), run)
    tally.row["lost"] = lost(before, data)
    return tally.row


def small_fs(size: str, read_only: bool = False) -> Path | None:
    """A real tmpfs of `size` (remounted read-only), or None where mounting is not allowed."""
    where = Path(tempfile.mkdtemp(prefix="chaos_fs_"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                       capture_output=True, timeout=10)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        shutil.rmtree(where, ignore_errors=True)
        return None
    return where


def unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True, timeout=10)
    shutil.rmtree(where, ignore_errors=True)


def disk_full(work: Path, data: Path) -> dict:
    """Runs whose output dir fills up part-way: each ends ok or in one line, its dir still consistent."""
    tally = Tally("full disk")
    before = snapshot(data)
    for i, size in enumerate(("64k", "400k", "1500k", "4m")):
        fs = small_fs(size)
        out = (fs or work / f"enospc_{i}") / "run"
        inject = None if fs else ["enospc", str((3, 8, 15, 30)[i]), str(out.parent)]
        proc = train([*base_args(data, work), f"output_dir={out}"], work, inject=inject)
        tally.command(proc)
        full = proc.returncode == 2 and "disk is full" in proc.stderr
        tally.row["injected"] += full
        problems = [] if proc.returncode == 0 or full else [f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"]
        if out.exists():
            problems += check_run_dir(out, finished=proc.returncode == 0)
            problems += [f"temp file left: {p.name}" for p in out.iterdir() if _SCRATCH.match(p.name)]
        tally.run_dir(problems, out)
        failed_on = proc.stderr.strip().splitlines()[-1].split(" (")[0].removeprefix("error: ") if full else ""
        tally.row["notes"].append(f"{'tmpfs ' + size if fs else 'ENOSPC injected'}: exit {proc.returncode} {failed_on}")
        if fs:
            unmount(fs)
    tally.row["lost"] = lost(before, data)
    return tally.row


def read_only_dir(work: Path, data: Path) -> dict:
    tally = Tally("read-only output dir")
    before = snapshot(data)
    fs = small_fs("1m", read_only=True)
    out = (fs or work / "erofs") / "run"
    proc = train([*base_args(data, work), f"output_dir={out}"], work,
                 inject=None if fs else ["erofs", "1", str(out.parent)])
    tally.command(proc)
    tally.row["injected"] = 1
    ok = proc.returncode == 2 and "not writable" in proc.stderr.splitlines()[-1]
    tally.run_dir([] if ok else [f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"], out)
    tally.row["notes"].append("read-only tmpfs" if fs else "EROFS injected")
    if fs:
        unmount(fs)
    tally.row["lost"] = lost(before, data)
    return tally.row


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height and whose pixel data is one empty chunk: a bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def write_bombs(folder: Path) -> list[str]:
    """Hostile files among real images; returns their names."""
    Image.new("L", (60000, 1)).save(folder / "strip.png")  # ~200 bytes; 256 x 15M px after a short-side resize
    _png_header_only(folder / "bomb.png", 100_000, 100_000)
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(folder / "deep16.png")  # 16-bit
    (folder / "empty.jpg").write_bytes(b"")
    real = next(folder.glob("*_0.png"))
    (folder / "truncated.png").write_bytes(real.read_bytes()[:120])
    return ["strip.png", "bomb.png", "deep16.png", "empty.jpg", "truncated.png"]


def run_measured(cmd: list[str], cwd: Path, timeout: int = 600) -> tuple[int, str, float, float]:
    """(exit code, stderr, peak RSS in MiB, seconds) of a command."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=_env())
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read(), usage.ru_maxrss / 1024, time.perf_counter() - start


def bomb_files(work: Path, data: Path) -> dict:
    """Training beside the bombs skips each with a reason in bounded memory; a hostile export fails in one line."""
    tally = Tally("bomb files, hostile export")
    bombs = work / "bombs"
    shutil.copytree(data, bombs)
    names = write_bombs(bombs / "red")
    before = snapshot(bombs)
    run = work / "bombs_run"
    rc, err, rss, _ = run_measured([sys.executable, "-m", "pipeline.train", *base_args(bombs, work),
                                    "trainer.epochs=1", f"output_dir={run}"], work)
    tally.command((None, err))
    tally.row["injected"] = len(names)
    problems = check_run_dir(run, finished=True) if rc == 0 else [f"exit {rc}: {err.strip()[-300:]}"]
    skipped = json.loads((run / "metrics.json").read_text()).get("skipped_files", 0) if rc == 0 else 0
    if skipped < len(names) - 1:  # the 16-bit PNG is a usable image: converted, not skipped
        problems.append(f"{skipped} files skipped of {len(names) - 1} unusable")
    tally.run_dir(problems, run)
    tally.row["notes"].append(f"train beside the bombs: exit {rc}, peak RSS {rss:.0f} MiB, {skipped} skipped")
    if rc == 0:
        export = work / "bombs_export"
        subprocess.run([sys.executable, "-m", "pipeline.export", f"run={run}", f"out={export}",
                        "export.formats=[safetensors]"], cwd=work, capture_output=True, text=True, env=_env())
        doc = json.loads((export / "model.json").read_text())
        doc["preprocessing"]["input_size"] = [3, 100_000, 100_000]
        (export / "model.json").write_text(json.dumps(doc))
        rc2, err2, rss2, sec = run_measured([sys.executable, "-m", "pipeline.predict", f"run={export}",
                                             f"images={bombs / 'blue'}"], work)
        tally.command((None, err2))
        tally.row["injected"] += 1
        last = (err2.strip().splitlines() or [""])[-1]
        one_line = rc2 == 2 and last.startswith("error: ") and "input_size" in last  # names the field at fault
        tally.run_dir([] if one_line else [f"hostile export: exit {rc2}: {err2.strip()[-300:]}"], export)
        tally.row["notes"].append(f"predict on input_size 100000^2: exit {rc2}, peak RSS {rss2:.0f} MiB, {sec:.1f} s: "
                                  f"{(err2.strip().splitlines() or [''])[-1][:160]}")
    tally.row["lost"] = lost(before, bombs)
    return tally.row


def print_table(rows: list[dict]) -> None:
    head = f"{'fault':34} {'injected':>8} {'runs consistent':>16} {'user files lost':>16} {'tracebacks':>11}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['fault']:34} {r['injected']:>8} {str(r['consistent']) + ' / ' + str(r['runs']):>16} "
              f"{r['lost']:>16} {r['tracebacks']:>11}")
    total = {k: sum(r[k] for r in rows) for k in ("injected", "runs", "consistent", "lost", "tracebacks")}
    print("-" * len(head) + f"\n{'total':34} {total['injected']:>8} "
          f"{str(total['consistent']) + ' / ' + str(total['runs']):>16} {total['lost']:>16} {total['tracebacks']:>11}")
    for r in rows:
        for note in r["notes"]:
            print(f"  {r['fault']}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="kill -9 runs, split between the two paths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "chaos"), help="where chaos.json goes")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names to run (default: all)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scenarios = {"kill": None, "concurrent": concurrent_runs, "race": resume_race, "disk": disk_full,
                 "readonly": read_only_dir, "bombs": bomb_files}
    rows = []
    with tempfile.TemporaryDirectory(prefix="chaos_") as tmp:  # the suite's own scratch dir
        work = Path(tmp)
        data = write_images(work / "users_images")
        for name in args.only or scenarios:
            if name == "kill":
                rows += [kill_runs(work, data, path, n, rng) for path, n in
                         (("finetune", (args.kills + 1) // 2), ("cached", args.kills // 2))]
            else:
                rows.append(scenarios[name](work, data))
    print_table(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "chaos.json").write_text(json.dumps(rows, indent=2))
    bad = sum(r["lost"] + r["tracebacks"] + r["runs"] - r["consistent"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
