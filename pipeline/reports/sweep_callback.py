"""Hydra callback (conf/hydra/default.yaml): write the sweep report when a multirun ends."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_logger = logging.getLogger(__name__)


class SweepReportCallback(Callback):
    """report.md/.csv/.png in the sweep dir at the end of every multirun (reports/sweep.py)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline.reports.sweep import write_report  # imported here: plain runs never pay for matplotlib

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            write_report(sweep_dir)
        except Exception as e:  # the runs are done and on disk; a report problem must not fail the sweep
            _logger.warning("Could not write the sweep report (%s: %s); retry with: make report SWEEP=%s",
                            type(e).__name__, e, sweep_dir)
