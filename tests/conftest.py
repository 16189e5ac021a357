"""Shared fixtures: tiny real image files on disk and the composed project config.

Tests mirror the package: tests/<package>/test_<module>.py; tests/cli/ holds the entry points' tests.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from pipeline.config import register_configs
from pipeline.runtime.process import tune_allocator

tune_allocator()  # the test session is an entry point: 3-5x faster torch on glibc (runtime/process.py)
ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"  # the real datasets beside the checkout (../shared/datasets)
HYMENOPTERA = SHARED_DATASETS / "hymenoptera"
CLASSES = ["blue", "green", "red"]
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


def write_tiny_folder(root: Path, val: dict[str, int] | None = None) -> Path:
    """The tiny dataset every training test uses: 3 classes, train 12 each + val 4 each (PNG files)."""
    make_imagefolder(root, {c: 12 for c in CLASSES}, "train")
    make_imagefolder(root, val or {c: 4 for c in CLASSES}, "val", offset=500)
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return write_tiny_folder(tmp_path / "tiny")


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


def train_and_export(base: Path, formats: list[str]) -> tuple[Path, Path, Path]:
    """A tiny real run (3-class PNG folder, random-init test_efficientnet) and its export: (data, run, export).
    The plain model (trainer.calibrate=false): calibrated exports are tests/ship/test_calibrated_export.py's."""
    from pipeline.ship.saving import export_run
    from pipeline.train import train

    data = write_tiny_folder(base / "tiny")
    cfg = compose_cfg([f"output_dir={base / 'run'}", f"data_dir={base / 'data'}", "trainer=smoke", "dataset=folder",
                       f"dataset.root={data}", "backbone=tiny", "backbone.input_size=64", "strategy=finetune",
                       "trainer.epochs=2", "trainer.max_train_batches=0", "optim.lr=0.01", "trainer.calibrate=false"])
    train(cfg)
    return data, base / "run", export_run(base / "run", base / "export", formats=formats)


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, run dir, export dir) of one tiny run exported in every format; shared by ship/ and cli/ tests."""
    return train_and_export(tmp_path_factory.mktemp("exported"), ["safetensors", "onnx", "torchscript"])


@pytest.fixture
def folder(exported, tmp_path) -> Path:
    """Three real images (one in a subfolder), a broken .jpg and a text file."""
    data, _, _ = exported
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.copy(data / "val/red/red_0.png", images / "red_0.png")
    shutil.copy(data / "val/blue/blue_1.png", images / "blue_1.png")
    shutil.copy(data / "val/green/green_2.png", images / "sub" / "green_2.png")
    (images / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (images / "notes.txt").write_text("not an image, not reported")
    return images


class SigintAtStep:
    """`arm(n)`: the n-th optimizer step of the next training sends this process a real SIGINT (a user's Ctrl-C);
    `disarm()` puts the step guard back, so a resumed run trains on undisturbed."""

    def __init__(self, monkeypatch):
        from pipeline.training.guard import StepGuard
        self.monkeypatch, self.guard, self.original, self.steps = monkeypatch, StepGuard, StepGuard.grads_ok, 0

    def arm(self, step: int) -> None:
        original = self.original

        def grads_ok_then_sigint(guard, *args):
            self.steps += 1
            if self.steps == step:
                os.kill(os.getpid(), signal.SIGINT)
            return original(guard, *args)

        self.monkeypatch.setattr(self.guard, "grads_ok", grads_ok_then_sigint)

    def disarm(self) -> None:
        self.monkeypatch.setattr(self.guard, "grads_ok", self.original)


@pytest.fixture
def sigint_at_step(monkeypatch) -> SigintAtStep:
    return SigintAtStep(monkeypatch)
