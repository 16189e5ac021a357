"""The typed views of the config groups: each reads every key of its group that it is about, so a knob added to
the schema is either read or named here as belonging elsewhere."""
from dataclasses import fields

from conftest import compose_cfg
from pipeline.config.schema import AugmentConfig, DatasetConfig
from pipeline.data.augment import TrainAugment
from pipeline.data.folder import SplitLayout
from pipeline.data.loaders import LoaderSettings

BATCH_LEVEL_AUGMENT = {"mixup", "cutmix", "mix_prob"}  # whole batches: training/mixing.py


def _names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def test_the_train_transform_reads_every_per_image_augment_knob():
    assert _names(AugmentConfig) - _names(TrainAugment) == BATCH_LEVEL_AUGMENT
    assert _names(TrainAugment) <= _names(AugmentConfig)


def test_typed_views_take_the_values_of_the_composed_config():
    cfg = compose_cfg(["augment=heavy", "dataset=flowers", "augment.extra=[{name: CLAHE, p: 0.5}]",
                       "dataset.val_fraction=0.3", "trainer.batch_size=7", "dataset.sampler=balanced"])
    knobs = TrainAugment.from_group(cfg.augment)
    assert {f: getattr(knobs, f) for f in _names(TrainAugment) - {"extra"}} == \
        {f: cfg.augment[f] for f in _names(TrainAugment) - {"extra"}}
    assert knobs.extra == ({"name": "CLAHE", "p": 0.5},) and isinstance(knobs.extra[0], dict)
    layout = SplitLayout.from_group(cfg.dataset)
    assert _names(SplitLayout) <= _names(DatasetConfig)
    assert {f: getattr(layout, f) for f in _names(SplitLayout)} == {f: cfg.dataset[f] for f in _names(SplitLayout)}
    settings = LoaderSettings.from_groups(cfg.trainer, cfg.dataset, cfg.seed)
    assert (settings.batch_size, settings.sampler, settings.seed) == (7, "balanced", cfg.seed)
