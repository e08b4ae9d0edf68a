"""Typed run configuration: the schema (config/schema.py), the named choices (choices.py), the presets
(presets.py), and resolving, saving and comparing configs (loading.py)."""

from fedgen.config.loading import (
    apply_overrides,
    diff,
    flatten,
    load,
    preset,
    read,
    save,
    to_dict,
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
    ModelConfig,
    PGAConfig,
    PrivacyConfig,
    RuntimeConfig,
    TrainConfig,
    ignored_settings,
)

__all__ = [
    "DEFAULT_PRESET", "PRESETS", "RESUMABLE_CHANGES", "Config", "ConfigError", "DataConfig", "DiffusionConfig",
    "EvalConfig", "FLConfig", "LogConfig", "ModelConfig", "PGAConfig", "PrivacyConfig", "RuntimeConfig",
    "TrainConfig", "apply_overrides", "diff", "flatten", "ignored_settings", "load", "preset", "read", "save",
    "to_dict", "validate",
]
