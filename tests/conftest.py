"""Shared fixtures: tiny real image files on disk and the composed project config."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import pipeline  # noqa: F401  (allocator tuning before torch)
from pipeline.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


def write_image(path: Path, color: tuple[int, int, int], size: int = 40, seed: int = 0, fmt: str = "PNG") -> Path:
    """A noisy solid-colour image with a bright square: learnable, but not trivial pixel-identical."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, np.float32) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    x, y = rng.integers(0, size // 2, 2)
    arr[y:y + size // 3, x:x + size // 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


COLORS = {"blue": (20, 40, 200), "green": (30, 180, 40), "red": (200, 30, 30)}


def make_imagefolder(root: Path, per_class: dict[str, int], split: str = "train", offset: int = 0) -> Path:
    for c, n in per_class.items():
        for i in range(n):
            write_image(root / split / c / f"{c}_{i}.png", COLORS[c], seed=offset + 1000 * len(c) + i)
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """3 classes, train 12 each + val 4 each (PNG files)."""
    root = tmp_path / "tiny"
    make_imagefolder(root, {"blue": 12, "green": 12, "red": 12}, "train")
    make_imagefolder(root, {"blue": 4, "green": 4, "red": 4}, "val", offset=500)
    return root


def compose_cfg(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


@pytest.fixture
def cfg_factory(tmp_path: Path):
    """Compose the real config with test-size overrides and tmp output/data dirs."""
    def make(*overrides: str):
        base = [f"output_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}",
                f"backbone.cache_dir={Path('data/weights').resolve()}", "trainer=smoke"]
        return compose_cfg(base + list(overrides))
    return make
