"""Entry point: `python -m pipeline.rank dataset=X backbones=[a,b,c]` (or `make rank`): rank backbones and their
feature levels by LogME on the train split (features/ranking.py); rank.md and rank.json in the run dir."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import check_overrides, check_values, register_configs
from pipeline.errors import exit_on_user_error
from pipeline.features.ranking import rank_backbones
from pipeline.runtime.process import tune_allocator

register_configs()


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"),
            config_name="config")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        check_values(cfg)
        rank_backbones(cfg)


if __name__ == "__main__":
    tune_allocator()
    with exit_on_user_error():
        check_overrides(sys.argv[1:])
    main()
