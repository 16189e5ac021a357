"""Entry point: `python -m pipeline.report [sweep=DIR] [out=DIR] [plot=false]` (or `make report [SWEEP=DIR]`).

Aggregates a Hydra multirun dir (default: the newest under outputs/multirun/) into report.md, report.csv and
report.png (reports/sweep.py). A sweep also writes them itself when it ends (reports/sweep_callback.py).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.errors import ConfigError, check_choice, exit_on_user_error
from pipeline.reports.sweep import latest_sweep, write_report
from pipeline.runtime.cli import split_args

OWN_KEYS = {"sweep": None, "out": None, "plot": "true"}  # this command takes only these keys


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error():
        own, extra = split_args(sys.argv[1:] if argv is None else argv, OWN_KEYS, prog="report")
        if extra:
            raise ConfigError(f"report: unknown key(s) {extra}; it takes sweep=DIR, out=DIR and plot=true|false")
        check_choice("plot", str(own["plot"]).lower(), ("true", "false"))
        sweep = Path(own["sweep"] or latest_sweep())
        rows = write_report(sweep, own["out"], plot=str(own["plot"]).lower() == "true")
    print((Path(own["out"] or sweep) / "report.md").read_text())
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} of {len(rows)} runs did not finish ok: see 'Failed runs' above", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
