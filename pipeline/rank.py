"""Entry point: `python -m pipeline.rank dataset=X backbones=[a,b,c]` (or `make rank`): rank backbones and their
feature levels by LogME on the train split (features/ranking.py); rank.md and rank.json in the run dir."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import check_overrides, check_values, register_configs
from pipeline.data.build import build_data
from pipeline.errors import exit_on_user_error
from pipeline.features.cached_fit import extraction
from pipeline.features.ranking import rank_backbones
from pipeline.runtime import owned
from pipeline.runtime.devices import select_device
from pipeline.runtime.process import set_threads, tune_allocator
from pipeline.training.run_setup import resolve_run_dir

register_configs()


def rank(cfg: DictConfig) -> dict:
    """Rank `cfg.backbones` (default: `backbone.name`) on the dataset's train split (features/ranking.py)."""
    names = list(cfg.backbones) or [cfg.backbone.name]
    run_dir = owned.prepare_output_dir(resolve_run_dir(cfg.output_dir), "rank",
                                       "choose a new dir (hydra.run.dir=... or output_dir=...)")
    set_threads(cfg.trainer.threads)
    device = select_device(cfg.trainer.device)
    splits, _ = build_data(cfg.dataset, seed=cfg.seed)
    return rank_backbones(names, splits, extraction(cfg.features, cfg.trainer, device), backbone_cfg=cfg.backbone,
                          dataset=cfg.dataset, seed=cfg.seed, run_dir=run_dir)


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"),
            config_name="config")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        check_values(cfg)
        rank(cfg)


if __name__ == "__main__":
    tune_allocator()
    with exit_on_user_error():
        check_overrides(sys.argv[1:])
    main()
