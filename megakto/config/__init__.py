"""Typed run configuration: nested dataclasses, loaded from YAML plus dotted ``key=value`` overrides.

- :mod:`~megakto.config.schema`: the dataclasses, one per YAML section, with every field's default
  and help text;
- :mod:`~megakto.config.loader`: YAML file and overrides -> :class:`Config`, derived defaults, and
  back to YAML;
- :mod:`~megakto.config.coerce`: values by their field's annotation, from YAML or the command line;
- :mod:`~megakto.config.validation`: cross-field rules, checked once at start-up;
- :mod:`~megakto.config.hints`: the suggestion at the end of an unknown-key error;
- :mod:`~megakto.config.help`: the ``--help-config`` text.

Every failure is a one-line :class:`~megakto.errors.ConfigError` naming the key and what is allowed.
"""

from megakto.config.help import config_help
from megakto.config.loader import config_to_dict, load_config, resolve_defaults, save_config
from megakto.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DistConfig,
    ParallelConfig,
    HealthConfig,
    KTOConfig,
    ModelConfig,
    OptimConfig,
    RefConfig,
    TrainConfig,
)
from megakto.config.validation import validate

__all__ = [
    "Config",
    "ModelConfig",
    "DataConfig",
    "KTOConfig",
    "TrainConfig",
    "OptimConfig",
    "RefConfig",
    "CheckpointConfig",
    "DistConfig",
    "ParallelConfig",
    "HealthConfig",
    "load_config",
    "validate",
    "resolve_defaults",
    "config_to_dict",
    "save_config",
    "config_help",
]
