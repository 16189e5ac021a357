"""Hydra callback (conf/hydra/default.yaml): mark the sweep dir as the pipeline's when a multirun starts (what
`make clean-outputs` may delete, runtime/owned.py), write the sweep report when it ends."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_logger = logging.getLogger(__name__)


class SweepReportCallback(Callback):
    """The sweep dir's mark at the start, report.md/.csv/.png in it at the end of every multirun (reports/sweep.py)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline.runtime import owned

        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
            return  # a dir that existed before (maybe the user's own) is never marked, so never deleted
        sweep_dir.mkdir(parents=True, exist_ok=True)
        owned.mark(sweep_dir, "sweep")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline.reports.sweep import write_report  # imported here: plain runs never pay for matplotlib

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            write_report(sweep_dir)
        except Exception as e:  # the runs are done and on disk; a report problem must not fail the sweep
            _logger.warning("Could not write the sweep report (%s: %s); retry with: make report SWEEP=%s",
                            type(e).__name__, e, sweep_dir)
