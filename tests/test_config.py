"""Config tree: every option composes; typos and wrong types fail at start-up."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf.errors import ConfigKeyError, ValidationError
from hydra.errors import ConfigCompositionException

from conftest import CONF_DIR, compose_cfg

GROUPS = ["dataset", "backbone", "strategy", "augment", "loss", "optim", "trainer", "export"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
    assert options, f"conf/{group} has no options"
    for option in options:
        cfg = compose_cfg([f"{group}={option}", "dataset.root=/some/where"])
        assert cfg[group] is not None


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
