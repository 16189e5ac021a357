"""report.png for a sweep: the monitored metric vs freeze depth (trainable params on a second axis), time per run."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.runtime.files import write_figure

_logger = logging.getLogger(__name__)

_DEPTH_KEYS = ("strategy", "strategy.mode", "strategy.freeze_depth")
_STATUS_COLORS = {"ok": "tab:blue", "failed": "tab:red", "incomplete": "tab:gray"}


def _series_label(varying: dict[str, str]) -> str:
    """The overrides that make a line (everything that varies except the depth itself)."""
    return " ".join(f"{k}={v}" for k, v in sorted(varying.items()) if k not in _DEPTH_KEYS)


def _plot_vs_depth(ax, ok: list[tuple[dict, dict]], monitor: str) -> None:
    series: dict[str, list[dict]] = {}
    for row, var in ok:
        series.setdefault(_series_label(var), []).append(row)
    params_ax, seen_params = ax.twinx(), set()
    for i, (label, runs) in enumerate(sorted(series.items())):
        runs = sorted(runs, key=lambda r: r["freeze_depth"])
        x, color = [r["freeze_depth"] for r in runs], f"C{i}"
        ax.plot(x, [r[f"val_{monitor}"] for r in runs], "o-", color=color, label=f"val {label}".strip())
        if all(r.get(f"test_{monitor}") is not None for r in runs):
            ax.plot(x, [r[f"test_{monitor}"] for r in runs], "s--", color=color, alpha=0.7,
                    label=f"test {label}".strip())
        params = tuple((r["freeze_depth"], r["trainable_params"]) for r in runs if r.get("trainable_params"))
        if params and params not in seen_params:
            seen_params.add(params)
            params_ax.plot([d for d, _ in params], [n / 1e6 for _, n in params], ":", marker="^", color="gray",
                           label="trainable params" if len(seen_params) == 1 else None)
    params_ax.set_ylabel("trainable params (M)", color="gray")
    ax.set_xlabel("frozen layer groups from the input (0 = full fine-tune)")
    ax.set_ylabel(f"{monitor} (best epoch)")
    ax.set_xticks(sorted({r["freeze_depth"] for r, _ in ok}))
    ax.set_title(f"{monitor} and trainable params vs freeze depth")
    handles = ax.get_legend_handles_labels()
    extra = params_ax.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="best")


def _plot_per_run(ax, ok: list[tuple[dict, dict]], monitor: str) -> None:
    ax.bar(range(len(ok)), [r[f"val_{monitor}"] for r, _ in ok], color="tab:blue")
    ax.set_xticks(range(len(ok)), [str(r["job"]) for r, _ in ok])
    ax.set_xlabel("job (overrides in report.md)")
    ax.set_ylabel(f"val {monitor} (best epoch)")
    ax.set_title(f"val {monitor} per run")


def _plot_times(ax, rows: list[dict]) -> None:
    heights = [r["train_seconds"] or 0.0 for r in rows]
    ax.bar(range(len(rows)), heights, color=[_STATUS_COLORS.get(r["status"], "black") for r in rows])
    ax.set_xticks(range(len(rows)), [f"{r['job']}\ndepth {r['freeze_depth']}" if r["freeze_depth"] is not None
                                     else str(r["job"]) for r in rows], fontsize=8)
    for i, (height, row) in enumerate(zip(heights, rows)):
        if row["status"] != "ok":
            ax.annotate(row["status"], (i, height), ha="center", va="bottom", fontsize=7, color="tab:red")
    ax.set_xlabel("job")
    ax.set_ylabel("wall time per run (s)")
    ax.set_title("time per run")


def plot_sweep(rows: list[dict], varying: list[dict[str, str]], path: Path) -> str | None:
    """Write the figure to `path`; returns its file name, or None when no run finished ok."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(r, v) for r, v in zip(rows, varying) if r["status"] == "ok"]
    if not ok:
        _logger.warning("No run finished ok: no report.png")
        return None
    monitor = ok[0][0]["monitor"] or "balanced_accuracy"
    fig, (ax, ax_time) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    depths = {r["freeze_depth"] for r, _ in ok}
    if len(depths) > 1 and all(isinstance(d, int) for d in depths):
        _plot_vs_depth(ax, ok, monitor)
    else:
        _plot_per_run(ax, ok, monitor)
    _plot_times(ax_time, rows)
    fig.tight_layout()
    write_figure(path, fig, dpi=110)
    plt.close(fig)
    return Path(path).name
