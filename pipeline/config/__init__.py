"""The config: its schema (types and valid values of every key), the one validator, and composing conf/.

Values live in conf/ (YAML); this package holds no values. It imports no Hydra at module level, so every layer
may read its choices (the tuples of config/schema.py).
"""
from pipeline.config.checks import check_group, check_number, check_values
from pipeline.config.compose import check_overrides, compose_config
from pipeline.config.schema import (
    AMP,
    BACKBONE_MODES,
    BN_POLICIES,
    CACHE_MODES,
    CONF_DIR,
    DECODERS,
    DEDUP_MODES,
    DEVICES,
    EXPORT_FORMATS,
    GROUPS,
    HEADS,
    LOSSES,
    MISSING,
    MODES,
    MONITORS,
    OPTIMIZERS,
    PRESETS,
    PRIOR_BIAS,
    SAMPLERS,
    SCHEDULERS,
    SOURCES,
    WEIGHT_MODES,
    AuditConfig,
    AugmentConfig,
    AutoStrategyConfig,
    BackboneConfig,
    Config,
    DatasetConfig,
    ExportConfig,
    FeaturesConfig,
    LossConfig,
    OptimConfig,
    StrategyConfig,
    TrainerConfig,
    choice,
    number,
    register_configs,
    value,
)

__all__ = [
    "check_group", "check_number", "check_values", "check_overrides", "compose_config", "AMP", "BN_POLICIES",
    "BACKBONE_MODES", "CACHE_MODES", "CONF_DIR", "DECODERS", "DEDUP_MODES", "DEVICES", "EXPORT_FORMATS", "GROUPS",
    "HEADS", "LOSSES",
    "MISSING", "MODES", "MONITORS", "OPTIMIZERS", "PRESETS", "PRIOR_BIAS", "SAMPLERS", "SCHEDULERS", "SOURCES",
    "WEIGHT_MODES", "AuditConfig", "AugmentConfig", "AutoStrategyConfig", "BackboneConfig", "Config",
    "DatasetConfig", "ExportConfig", "FeaturesConfig", "LossConfig", "OptimConfig", "StrategyConfig",
    "TrainerConfig", "choice", "number", "register_configs", "value",
]
