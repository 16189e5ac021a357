"""Validation before heavy work (one test per message), atomic checkpoint writes, unwritable/full disks, seeding."""
from __future__ import annotations

import errno
import logging
import random
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import compose_cfg, make_imagefolder
from pipeline import checkpoint, seeding
from pipeline.errors import ConfigError, MissingFileError, OutputError
from pipeline.validate import check_dataset_layout, ensure_writable_dir, validate_config


@pytest.mark.parametrize("override, message", [
    ("trainer.epochs=0", "trainer.epochs=0 must be positive (e.g. trainer.epochs=5)"),
    ("trainer.batch_size=0", "trainer.batch_size=0 must be positive"),
    ("trainer.eval_batch_size=-4", "trainer.eval_batch_size=-4 must be positive"),
    ("trainer.num_workers=-1", "trainer.num_workers=-1 must be >= 0"),
    ("trainer.grad_clip=-1.0", "trainer.grad_clip=-1.0 must be >= 0.0 (e.g. trainer.grad_clip=1.0)"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps=0 must be positive"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0.0"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0 must be >= 0.0"),
    ("dataset.min_per_class=0", "dataset.min_per_class=0 must be positive"),
    ("dataset.val_fraction=1.0", "dataset.val_fraction=1.0 must be in (0, 1)"),
    ("optim.lr=0", "optim.lr=0.0 must be positive"),
    ("trainer.monitor=auc", "trainer.monitor='auc' is not valid; choose one of"),
    ("backbone.name=tf_efficientnet_lite9", "not a timm model; did you mean: tf_efficientnet_lite"),
])
def test_each_config_error_names_the_setting_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_cfg(["backbone=tiny", override]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_weights_file_is_checked_against_the_arch_before_any_work(tmp_path):
    tiny = timm.create_model("test_efficientnet", num_classes=3)
    path = tmp_path / "tiny.safetensors"
    save_file(tiny.state_dict(), str(path))
    validate_config(compose_cfg(["backbone=tiny", f"backbone.weights={path}"]))  # matching arch: fine
    with pytest.raises(ConfigError, match=f"Weights from backbone.weights={path} do not match test_resnet"):
        validate_config(compose_cfg(["backbone=tiny", "backbone.name=test_resnet", f"backbone.weights={path}"]))
    with pytest.raises(MissingFileError, match="backbone.weights file not found"):
        validate_config(compose_cfg(["backbone=tiny", f"backbone.weights={tmp_path / 'nope.pth'}"]))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="Cannot read weights file"):
        validate_config(compose_cfg(["backbone=tiny", f"backbone.weights={tmp_path / 'bad.pth'}"]))


def test_bad_config_fails_before_the_data_is_touched(cfg_factory, tmp_path):
    from pipeline.train import train

    cfg = cfg_factory("dataset=folder", f"dataset.root={tmp_path / 'nowhere'}", "backbone.name=resnet5O")
    with pytest.raises(ConfigError, match="did you mean"):
        train(cfg)
    assert not Path(cfg.output_dir).exists()  # nothing was written


def _layout(root: Path, **kw):
    defaults = dict(train_split="train", val_split="val", val_fraction=0.2, min_per_class=1)
    check_dataset_layout(root, **{**defaults, **kw})


def test_classes_below_min_per_class_are_named(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"blue": 3, "green": 1})
    (root / "train" / "red").mkdir()
    with pytest.raises(ConfigError, match=r"fewer than 1 train image file\(s\) in .*: \{'red': 0\}; add images"):
        _layout(root)
    (root / "train" / "red").rmdir()
    with pytest.raises(ConfigError, match=r"fewer than 3 .*\{'green': 1\}.* or lower dataset.min_per_class"):
        _layout(root, min_per_class=3)


def test_impossible_val_split_is_an_error_and_a_single_image_class_stays_in_train(tmp_path, caplog):
    from pipeline.data import load_imagefolder

    root = make_imagefolder(tmp_path / "d", {"blue": 1, "green": 1})
    with pytest.raises(ConfigError, match=r"No val/ folder .* only 2 train images for 2 classes: .* add .*/val/"):
        _layout(root)
    _layout(root, val_split="train")  # with a val folder there is nothing to split
    root = make_imagefolder(tmp_path / "e", {"blue": 6, "green": 6, "red": 1})
    _layout(root)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        splits = load_imagefolder(root, workers=1)
    assert "single train image kept in train, so val has no image of them: ['red']" in caplog.text
    assert len(splits.train) + len(splits.val) == 13
    red = splits.classes.index("red")
    assert splits.train.labels.count(red) == 1 and red not in splits.val.labels
    val = splits.val.counts()
    assert len(splits.val) == 3 and val["red"] == 0 and min(val["blue"], val["green"]) >= 1


def test_unwritable_output_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputError, match=f"Output dir {blocker / 'run'} is not writable .*set output_dir="):
        ensure_writable_dir(blocker / "run")

    def denied(self, data):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(OutputError, match=r"is not writable \(Permission denied\)"):
        ensure_writable_dir(tmp_path / "ok")


def test_disk_full_between_write_and_rename_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    model = timm.create_model("test_efficientnet", num_classes=3)
    meta = {"arch": "test_efficientnet", "num_classes": 3, "epoch": 1}
    checkpoint.save_checkpoint(tmp_path, "best", model, meta)
    checkpoint.save_state(tmp_path, {"epoch": 1, "model": model.state_dict()})
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "replace", full)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"best.safetensors \(No space left on device\); the "
                                                             r"previous version is intact; the disk is full"):
        checkpoint.save_checkpoint(tmp_path, "best", model, {**meta, "epoch": 2})
    with pytest.raises(OutputError, match="last.pt .*previous version is intact"):
        checkpoint.save_state(tmp_path, {"epoch": 2, "model": model.state_dict()})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors", "last.pt"]  # no .tmp
    best, saved_meta = checkpoint.load_checkpoint(tmp_path, "best")
    state = checkpoint.load_state(tmp_path / "last.pt")
    assert saved_meta["epoch"] == 1 and state["epoch"] == 1
    assert all(torch.equal(best.state_dict()[k], old[k]) and torch.equal(state["model"][k], old[k]) for k in old)


class _Draws(torch.utils.data.Dataset):
    def __init__(self):
        self.transform = A.Compose([A.HorizontalFlip(p=0.5)])
        seeding.seed_transform(self.transform, 0)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([self.transform.py_random.random(), torch.utils.data.get_worker_info().id])


def _worker_draws(seed: int) -> list:
    loader = torch.utils.data.DataLoader(_Draws(), batch_size=2, num_workers=2, worker_init_fn=seeding.seed_worker,
                                         generator=torch.Generator().manual_seed(seed))
    return torch.cat(list(loader)).tolist()


def test_workers_get_distinct_repeatable_augmentation_seeds():
    first, again, other = _worker_draws(7), _worker_draws(7), _worker_draws(8)
    assert first == again and first != other
    by_worker = {w: [d for d, wid in first if wid == w] for w in (0, 1)}
    assert by_worker[0] != by_worker[1]  # not the same stream copied into both workers


def test_rng_states_round_trip_through_a_saved_state(tmp_path):
    transform = A.Compose([A.HorizontalFlip(p=0.5)])
    seeding.seed_everything(3)
    seeding.seed_transform(transform, 3)
    checkpoint.save_state(tmp_path, {"g": seeding.get_global_rng_state(),
                                     "t": seeding.get_transform_rng_state(transform)})
    draws = lambda: (random.random(), np.random.rand(), torch.rand(1).item(), transform.py_random.random(),
                     transform.random_generator.random())
    expected = draws()
    state = checkpoint.load_state(tmp_path / "last.pt")  # weights_only=True
    seeding.set_global_rng_state(state["g"])
    seeding.set_transform_rng_state(transform, state["t"])
    assert draws() == expected
