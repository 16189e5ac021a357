"""Validation before heavy work (one test per message), atomic checkpoint writes, unwritable/full disks, seeding."""
from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from conftest import compose_cfg, make_imagefolder
from pipeline.data.folder import SplitLayout
from pipeline.data.folder import check_layout as check_dataset_layout
from pipeline.errors import ConfigError, MissingFileError, OutputError
from pipeline.runtime.files import ensure_writable_dir
from pipeline.training.validate import validate_config


@pytest.mark.parametrize("override, message", [
    ("trainer.epochs=0", "trainer.epochs=0 must be positive (e.g. trainer.epochs=5)"),
    ("trainer.time_limit=null", "trainer.epochs and trainer.time_limit are both null: give a wall-clock budget"),
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


def _layout(root: Path, min_per_class: int = 1, **layout):
    check_dataset_layout(root, SplitLayout(**layout), min_per_class=min_per_class)


def test_classes_below_min_per_class_are_named(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"blue": 3, "green": 1})
    (root / "train" / "red").mkdir()
    with pytest.raises(ConfigError, match=r"fewer than 1 train image file\(s\) in .*: \{'red': 0\}; add images"):
        _layout(root)
    (root / "train" / "red").rmdir()
    with pytest.raises(ConfigError, match=r"fewer than 3 .*\{'green': 1\}.* or lower dataset.min_per_class"):
        _layout(root, min_per_class=3)


def test_impossible_val_split_is_an_error_and_a_single_image_class_stays_in_train(tmp_path, caplog):
    from pipeline.data.folder import load_imagefolder

    root = make_imagefolder(tmp_path / "d", {"blue": 1, "green": 1})
    with pytest.raises(ConfigError, match=r"No val/ folder .* only 2 train images for 2 classes: .* add .*/val/"):
        _layout(root)
    _layout(root, val_split="train")  # with a val folder there is nothing to split
    root = make_imagefolder(tmp_path / "e", {"blue": 6, "green": 6, "red": 1})
    _layout(root)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.folder"):
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
