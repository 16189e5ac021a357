"""Sweep report: every run of a Hydra multirun in one table and one figure.

    python -m pipeline.report sweep=outputs/multirun/<sweep>      (or: make report SWEEP=...)

Writes `report.csv` (one row per run, every column), `report.md` (the readable table: the overrides that vary
between runs, status, freeze depth, trainable params, time, best epoch, val/test metrics; failed runs with their
error) and `report.png` (the monitored metric vs freeze depth with trainable params on a second axis, and the
time per run) into the sweep dir. Any multirun works: a run is a dir with `.hydra/overrides.yaml` or
`metrics.json`. Runs a Hydra callback at the end of every multirun (reports/sweep_callback.py).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import yaml

from pipeline.errors import MissingFileError
from pipeline.runtime import owned
from pipeline.runtime.files import write_csv, write_text

_logger = logging.getLogger(__name__)

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "loss")
COLUMNS = ["job", "run", "status", "overrides", "mode", "freeze_depth", "n_groups", "trainable_params",
           "total_params", "train_seconds", "best_epoch", "epochs", "monitor"] + \
          [f"{split}_{m}" for split in ("val", "test") for m in METRICS] + ["error"]
_SHORT = {"accuracy": "acc", "balanced_accuracy": "bal. acc", "macro_f1": "macro-F1", "loss": "loss"}


def _read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Run dirs under `sweep_dir`: dirs holding `.hydra/overrides.yaml` (Hydra's record) or `metrics.json`."""
    dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    dirs |= {p.parent for p in sweep_dir.rglob("metrics.json")}
    return sorted(d for d in dirs if d != sweep_dir)


def run_status(metrics: dict | None, run_dir: Path) -> tuple[str, str]:
    """("ok" | "failed" | "incomplete", error). A NaN train loss or monitored metric counts as failed."""
    if metrics is None:
        logs = sorted(run_dir.glob("*.log"))
        lines = [ln for ln in logs[0].read_text(errors="replace").splitlines() if ln.strip()] if logs else []
        last = f"; last log line: {lines[-1][:200]}" if lines else ""
        return "incomplete", f"no metrics.json: the job was killed or is still running{last}"
    if metrics.get("status") == "failed":
        return "failed", str(metrics.get("error", "unknown error"))
    diverged = [h.get("epoch") for h in metrics.get("history", []) if not _finite(h.get("train_loss"))]
    if diverged:
        return "failed", f"train loss is not finite from epoch {diverged[0]} (diverged)"
    monitor = metrics.get("monitor", "balanced_accuracy")
    if not _finite(metrics.get("val", {}).get(monitor)):
        return "failed", f"val {monitor} is not finite"
    return "ok", ""


def load_run(run_dir: Path, sweep_dir: Path) -> dict:
    """One report row from a run dir (metrics.json, config.yaml and Hydra's .hydra/ record)."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as e:
        metrics = {"status": "failed", "error": f"unreadable metrics.json ({e})"}
    status, error = run_status(metrics, run_dir)
    metrics = metrics or {}
    cfg = _read_yaml(run_dir / "config.yaml") or _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    strategy = cfg.get("strategy") or {}
    job = ((_read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}).get("job", {}).get("num")
    if job is None:
        match = re.match(r"(\d+)", run_dir.name)
        job = int(match.group(1)) if match else None
    row = {"job": job, "run": str(run_dir.relative_to(sweep_dir)), "status": status,
           "overrides": " ".join(_read_yaml(run_dir / ".hydra" / "overrides.yaml") or []),
           "mode": metrics.get("mode", strategy.get("mode")),
           "freeze_depth": metrics.get("freeze_depth", strategy.get("freeze_depth")),
           "monitor": metrics.get("monitor", (cfg.get("trainer") or {}).get("monitor")),
           "epochs": len(metrics.get("history", [])) or None, "error": error}
    for key in ("n_groups", "trainable_params", "total_params", "train_seconds", "best_epoch"):
        row[key] = metrics.get(key)
    for split in ("val", "test"):
        for m in METRICS:
            row[f"{split}_{m}"] = (metrics.get(split) or {}).get(m)
    return row


def collect_runs(sweep_dir: str | Path) -> list[dict]:
    """Rows for every run of the sweep, in job order. Raises MissingFileError when there is nothing to read."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MissingFileError(f"Sweep dir '{sweep_dir}' not found; pass a dir under outputs/multirun/ "
                               "(make report SWEEP=outputs/multirun/<sweep>)")
    rows = [load_run(d, sweep_dir) for d in find_run_dirs(sweep_dir)]
    if not rows:
        raise MissingFileError(f"No runs in '{sweep_dir}' (no .hydra/overrides.yaml or metrics.json below it); "
                               "is it the dir of a multirun (python -m pipeline.train -m ...)?")
    return sorted(rows, key=lambda r: (r["job"] is None, r["job"] if r["job"] is not None else 0, r["run"]))


def split_overrides(rows: list[dict]) -> tuple[list[str], list[dict[str, str]]]:
    """(overrides shared by every run, per-run dict of the overrides that vary between runs)."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r["overrides"].split()) for r in rows]
    keys = {k for p in parsed for k in p}
    common = sorted(k for k in keys if all(k in p for p in parsed) and len({p[k] for p in parsed}) == 1)
    shared = [f"{k}={parsed[0][k]}" for k in common]
    return shared, [{k: v for k, v in p.items() if k not in common} for p in parsed]


def best_run(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["status"] == "ok" and _finite(r.get(f"val_{r['monitor']}"))]
    return max(ok, key=lambda r: r[f"val_{r['monitor']}"]) if ok else None


def write_sweep_csv(rows: list[dict], path: Path) -> Path:
    """report.csv: every column of COLUMNS, one row per run."""
    return write_csv(path, [["" if r.get(c) is None else r.get(c) for c in COLUMNS] for r in rows], header=COLUMNS)


def _fmt_params(row: dict) -> str:
    n, total = row.get("trainable_params"), row.get("total_params")
    if not isinstance(n, int):
        return ""
    share = f" ({100 * n / total:.0f}%)" if total else ""
    return f"{n / 1e6:.2f}M{share}" if n >= 1_000_000 else f"{n:,}{share}"


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], varying: list[dict[str, str]]) -> list[str]:
    """The readable table; val/test columns only for splits that some run has."""
    metric_cols = [f"{s}_{m}" for s in ("val", "test") for m in METRICS[:3] if any(r.get(f"{s}_{m}") is not None
                                                                                      for r in rows)]
    head = ["job", "overrides", "status", "mode", "freeze depth", "trainable params", "time (s)", "best epoch"]
    head += [f"{c.split('_', 1)[0]} {_SHORT[c.split('_', 1)[1]]}" for c in metric_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, var in zip(rows, varying):
        overrides = " ".join(f"{k}={v}" for k, v in var.items()) or "(none)"
        best = "" if row["best_epoch"] is None else f"{row['best_epoch']}/{row['epochs']}"
        cells = [_cell(row["job"]), f"`{overrides}`", row["status"], _cell(row["mode"]), _cell(row["freeze_depth"]),
                 _fmt_params(row), _cell(row["train_seconds"], 0), best] + [_cell(row[c]) for c in metric_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(rows: list[dict], sweep_dir: Path, plot_name: str | None) -> str:
    shared, varying = split_overrides(rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "incomplete")}
    lines = [f"# Sweep report: {sweep_dir.name}", "", f"- sweep dir: `{sweep_dir}`",
             f"- runs: {len(rows)} (" + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ")",
             f"- overrides shared by every run: `{' '.join(shared) or '(none)'}`"]
    best = best_run(rows)
    if best:
        over = " ".join(f"{k}={v}" for k, v in varying[rows.index(best)].items()) or "(none)"
        lines.append(f"- best by val {best['monitor']}: job {best['job']} (`{over}`): "
                     f"{best['val_' + best['monitor']]:.4f}")
    optuna = _read_yaml(sweep_dir / "optimization_results.yaml")
    if optuna:
        lines.append(f"- optuna best value {optuna.get('best_value')} with `{optuna.get('best_params')}`")
    lines += ["", *markdown_table(rows, varying), ""]
    failed = [(r, v) for r, v in zip(rows, varying) if r["status"] != "ok"]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- job {r['job']} (`{' '.join(f'{k}={x}' for k, x in v.items())}`, {r['run']}): {r['error']}"
                  for r, v in failed] + [""]
    if plot_name:
        lines += [f"![metric vs freeze depth, time per run]({plot_name})", ""]
    return "\n".join(lines)


REPORT_FILES = ("report.csv", "report.png", "report.md")


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, plot: bool = True) -> list[dict]:
    """Aggregate the sweep into report.md, report.csv and (plot=True) report.png; returns the rows."""
    sweep_dir = Path(sweep_dir).resolve()
    rows = collect_runs(sweep_dir)
    fix = "choose another out=... (a new or empty dir)"  # a file of the user's is never overwritten
    if out_dir:
        out = owned.prepare_output_dir(out_dir, "report", fix)
    else:  # the sweep dir: marked when the sweep started (reports/sweep_callback.py), or the report's own
        out = sweep_dir
        if owned.owner(out) is None:
            for name in REPORT_FILES:
                owned.prepare_output_file(out / name, fix)
            owned.mark(out, "report")
    write_sweep_csv(rows, out / "report.csv")
    plot_name = None
    if plot:
        from pipeline.reports.sweep_plot import plot_sweep
        plot_name = plot_sweep(rows, split_overrides(rows)[1], out / "report.png")
    write_text(out / "report.md", markdown_report(rows, sweep_dir, plot_name))
    n_bad = sum(r["status"] != "ok" for r in rows)
    _logger.info("Sweep report: %s (%d runs, %d not ok)", out / "report.md", len(rows), n_bad)
    return rows


def latest_sweep(root: str | Path = "outputs/multirun") -> Path:
    """The newest sweep dir under `root` (names start with the date and time)."""
    sweeps = sorted(p for p in Path(root).glob("*") if p.is_dir())
    if not sweeps:
        raise MissingFileError(f"No sweep dirs under '{root}'; run `make sweep dataset=X` first, "
                               "or pass one: make report SWEEP=path/to/sweep")
    return sweeps[-1]
