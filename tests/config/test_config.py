"""Config tree (conf/ + pipeline/config/): every option composes, every value is written once, typos, wrong
types and values outside their constraints fail at start-up with one message format."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF_DIR, compose_cfg
from pipeline.config import GROUPS as SCHEMAS
from pipeline.config import check_values
from pipeline.errors import ConfigError

GROUPS = ["dataset", "backbone", "strategy", "augment", "loss", "optim", "trainer", "export", "features"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if not p.stem.startswith("_"))
    assert options, f"conf/{group} has no options"
    for option in options:
        cfg = compose_cfg([f"{group}={option}", "dataset.root=/some/where"])
        assert cfg[group] is not None
        check_values(cfg)  # the shipped values satisfy their own constraints


def test_unknown_key_fails_with_hydra_message():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["trainer.epoch=3"])
    assert "epoch" in str(err.value.__cause__) or "epoch" in str(err.value)


def test_unknown_key_in_a_yaml_option_fails(tmp_path):
    import shutil
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "trainer" / "typo.yaml").write_text("epocs: 3\n")
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises((ConfigKeyError, ConfigCompositionException, ValidationError), match="epocs"):
            compose(config_name="config", overrides=["trainer=typo"])


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["trainer.epochs=three"])
    assert "epochs" in str(err.value.__cause__)


def test_dataset_roots_follow_datasets_dir(monkeypatch):
    monkeypatch.setenv("DATASETS_DIR", "/mnt/sets")
    cfg = compose_cfg(["dataset=flowers"])
    assert cfg.dataset.root == "/mnt/sets/flowers"
    monkeypatch.delenv("DATASETS_DIR")
    assert compose_cfg(["dataset=chest_xray"]).dataset.root == "data/chest_xray"


def test_default_is_offline_digits_with_embedded_lite0():
    cfg = compose_cfg()
    assert cfg.dataset.source == "digits" and cfg.backbone.name == "tf_efficientnet_lite0"
    assert cfg.backbone.weights in ("auto", "embedded")


def test_schema_holds_no_values_and_conf_sets_every_key():
    """Defaults live once, in conf/: the schema declares types and constraints only, and the default config
    leaves no key unset (a `???` left over would fail here, not mid-run)."""
    from dataclasses import MISSING, fields

    from omegaconf import OmegaConf

    for group, schema in SCHEMAS.items():
        for f in fields(schema):
            assert f.default in ("???", MISSING) or f.name == "auto", f"{group}.{f.name}: a default in the schema"
    cfg = compose_cfg()
    assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)


@pytest.mark.parametrize("override, message", [
    ("dataset.cache=ram", "dataset.cache='ram' is not valid; choose one of: auto, none, memory, disk"),
    ("dataset.sampler=weighted", "dataset.sampler='weighted' is not valid; choose one of: shuffle, balanced"),
    ("dataset.source=s3", "dataset.source='s3' is not valid; choose one of: folder, digits"),
    ("dataset.dedup=all", "dataset.dedup='all' is not valid; choose one of: none, drop_from_eval"),
    ("strategy.mode=sideways", "strategy.mode='sideways' is not valid; choose one of: auto, linear_probe, partial"),
    ("strategy.bn=magic", "strategy.bn='magic' is not valid; choose one of: frozen, affine, train"),
    ("strategy.freeze_depth=-2", "strategy.freeze_depth=-2 is not valid: use an integer >= 0"),
    ("strategy.auto.sample_total=1", "strategy.auto.sample_total=1 must be >= 2"),
    ("augment.preset=haevy", "augment.preset='haevy' is not valid; choose one of: none, light, medium, heavy"),
    ("augment.scale_min=0", "augment.scale_min=0.0 must be in [0.001, 1] (e.g. augment.scale_min=0.5)"),
    ("augment.rotate=270", "augment.rotate=270.0 must be in [0.0, 180.0]"),
    ("loss.name=bce", "loss.name='bce' is not valid; choose one of: ce, focal"),
    ("loss.class_weights=inverse", "loss.class_weights='inverse' is not valid; choose one of: none, balanced"),
    ("loss.beta=1.0", "loss.beta=1.0 must be in [0, 1)"),
    ("loss.prior_bias=yes", "loss.prior_bias='yes' is not valid; choose one of: auto, true, false"),
    ("loss.label_smoothing=1", "loss.label_smoothing=1.0 must be in [0, 1)"),
    ("optim.name=lion", "optim.name='lion' is not valid; choose one of: adamw, sgd"),
    ("optim.scheduler=step", "optim.scheduler='step' is not valid; choose one of: cosine, constant"),
    ("optim.layer_decay=1.5", "optim.layer_decay=1.5 must be in (0, 1]"),
    ("trainer.device=tpu", "trainer.device='tpu' is not valid; choose one of: auto, cpu, cuda"),
    ("trainer.amp=fp8", "trainer.amp='fp8' is not valid; choose one of: auto, off, bf16, fp16"),
    ("trainer.monitor=val_acc", "trainer.monitor='val_acc' is not valid; choose one of: balanced_accuracy"),
    ("trainer.early_stop_patience=-1", "trainer.early_stop_patience=-1 must be >= 0"),
    ("features.head=svm", "features.head='svm' is not valid; choose one of: auto, linear, logistic"),
    ("export.opset=3", "export.opset=3 must be >= 7 (e.g. export.opset=17)"),
])
def test_every_choice_and_bound_is_checked_by_the_one_validator(override, message):
    with pytest.raises(ConfigError) as err:
        check_values(compose_cfg([override]))
    assert str(err.value).startswith(message), str(err.value)


def test_valid_values_pass_including_yaml_booleans():
    cfg = compose_cfg(["loss.prior_bias=true", "loss.class_weights={a: 2, b: 0.5}", "strategy.freeze_depth=all",
                       "features.num_workers=2", "dataset.input_size=96"])
    check_values(cfg)  # raises on any value it rejects
    assert cfg.loss.prior_bias is True and cfg.strategy.freeze_depth == "all"
    assert dict(cfg.loss.class_weights) == {"a": 2, "b": 0.5}
    with pytest.raises(ConfigError, match="dataset.input_size"):  # the same keys are checked, not skipped
        check_values(compose_cfg(["loss.prior_bias=true", "dataset.input_size=-96"]))

