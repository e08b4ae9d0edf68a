"""Typed run configuration: the schema (config/schema.py), the named choices (choices.py), the presets
(presets.py), and resolving, saving and comparing configs (loading.py)."""

from fedgen.config.loading import (
    DP_RECIPE,
    apply_overrides,
    diff,
    flatten,
    load,
    preset,
    privacy_defaults,
    read,
    save,
    to_dict,
    to_toml,
    validate,
)
from fedgen.config.presets import DEFAULT_PRESET, PRESETS
from fedgen.config.schema import (
    RESUMABLE_CHANGES,
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    FLConfig,
    LogConfig,
    MERFConfig,
    ModelConfig,
    PGAConfig,
    PrivacyConfig,
    RuntimeConfig,
    TrainConfig,
    ignored_settings,
)

__all__ = [
    "DEFAULT_PRESET", "DP_RECIPE", "PRESETS", "RESUMABLE_CHANGES", "Config", "ConfigError", "DataConfig",
    "DiffusionConfig", "EvalConfig", "FLConfig", "LogConfig", "MERFConfig", "ModelConfig", "PGAConfig",
    "PrivacyConfig", "RuntimeConfig", "TrainConfig", "apply_overrides", "diff", "flatten", "ignored_settings", "load",
    "preset", "privacy_defaults", "read", "save", "to_dict", "to_toml", "validate",
]
