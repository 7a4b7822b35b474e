"""Config from YAML plus dotted ``key=value`` overrides, and back to YAML.

:func:`load_config` starts from the schema's defaults, applies the YAML file's mapping of sections,
then each override in order (every override names one leaf), coerces each value by its field's
annotation (:mod:`megakto.config.coerce`), validates (:mod:`megakto.config.validation`) and fills
the derived defaults (:func:`resolve_defaults`).

Every failure is a one-line :class:`~megakto.errors.ConfigError` naming the key and what is allowed;
an unknown key adds a suggestion from :mod:`megakto.config.hints`.
"""

import dataclasses
import difflib
import os
from typing import Any, Optional

import yaml

from megakto.config.coerce import _Bad, _coerce, _describe, _literal_choices
from megakto.config.hints import unknown_key_hint
from megakto.config.schema import Config, _hints, _is_section, _leaf_keys
from megakto.config.validation import validate
from megakto.errors import ConfigError

__all__ = ["load_config", "resolve_defaults", "config_to_dict", "save_config"]


def _unknown_key(key: str, cls: type, prefix: str) -> ConfigError:
    valid = sorted(f.name for f in dataclasses.fields(cls))
    where = f"valid keys in '{prefix[:-1]}'" if prefix else "valid top-level keys"
    msg = f"unknown config key '{key}'; {where}: {', '.join(valid)}"
    sections = [f.name for f in dataclasses.fields(cls) if _is_section(_hints(cls)[f.name])]
    hint = unknown_key_hint(key, prefix, valid, sections, [k for k, _, _ in _leaf_keys()])
    if hint:
        msg += f"; {hint}"
    return ConfigError(msg)


def _set_leaf(obj: Any, cls: type, key: str, name: str, value: Any, origin: str) -> None:
    tp = _hints(cls)[name]
    try:
        setattr(obj, name, _coerce(value, tp))
    except _Bad:
        msg = f"config key '{key}' expects {_describe(tp)}, got {value!r} ({origin})"
        choices = _literal_choices(tp)
        if choices and isinstance(value, str):
            close = difflib.get_close_matches(value.strip(), choices, n=1)
            if close:
                msg += f"; did you mean '{close[0]}'?"
        raise ConfigError(msg) from None


def _field(cls: type, key: str, prefix: str, name: str) -> Any:
    if not isinstance(name, str) or name not in _hints(cls):
        raise _unknown_key(key, cls, prefix)
    return _hints(cls)[name]


def _apply_mapping(obj: Any, mapping: dict, prefix: str, origin: str) -> None:
    cls = type(obj)
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        tp = _field(cls, key, prefix, name)
        if _is_section(tp):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{key}' is a section and needs a mapping of its keys, "
                    f"got {value!r} ({origin})"
                )
            _apply_mapping(getattr(obj, name), value, key + ".", origin)
        else:
            _set_leaf(obj, cls, key, name, value, origin)


def _apply_override(cfg: Config, override: str) -> None:
    if "=" not in override:
        raise ConfigError(
            f"override '{override}' has no '='; write dotted key=value, e.g. train.max_steps=10"
        )
    key, value = override.split("=", 1)
    key = key.strip()
    origin = "command-line override"
    obj, prefix = cfg, ""
    parts = key.split(".")
    for i, name in enumerate(parts):
        cls = type(obj)
        tp = _field(cls, key, prefix, name)
        last = i == len(parts) - 1
        if _is_section(tp):
            if last:
                first = dataclasses.fields(tp)[0].name
                raise ConfigError(
                    f"config key '{key}' is a section; override one of its keys, "
                    f"e.g. {key}.{first}=..."
                )
            obj, prefix = getattr(obj, name), prefix + name + "."
        elif not last:
            raise ConfigError(f"config key '{prefix}{name}' is not a section; cannot set '{key}'")
        else:
            _set_leaf(obj, cls, key, name, value, origin)


# ---------------------------------------------------------------------------------------------
# Public API


def load_config(yaml_path: Optional[str], overrides: list[str]) -> Config:
    """Defaults <- YAML file (if any) <- overrides in order; then validate and fill derived defaults."""
    cfg = Config()
    if yaml_path is not None:
        if not os.path.isfile(yaml_path):
            raise ConfigError(f"config file not found: {yaml_path}")
        with open(yaml_path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark is not None else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(
                    f"config file {yaml_path} is not valid YAML{where}: {problem}"
                ) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {yaml_path} must hold a mapping of sections (model:, data:, ...), "
                f"got {type(data).__name__}"
            )
        _apply_mapping(cfg, data, "", f"in {yaml_path}")
    for override in overrides:
        _apply_override(cfg, override)
    validate(cfg)
    return resolve_defaults(cfg)


def resolve_defaults(cfg: Config) -> Config:
    """Fill the keys whose null default means "same as another key", so the saved config is explicit."""
    if cfg.model.tokenizer_path is None:
        cfg.model.tokenizer_path = cfg.model.path
    if cfg.ref.path is None:
        cfg.ref.path = cfg.model.path
    if cfg.data.max_prompt_length is None:
        cfg.data.max_prompt_length = cfg.data.max_length // 2
    if cfg.data.max_tokens_per_row is None:
        cfg.data.max_tokens_per_row = cfg.data.max_length
    if cfg.ref.cache_dir is None:
        cfg.ref.cache_dir = os.path.join(cfg.output_dir, "ref_cache")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (str, int, float, bool, None, lists) for YAML dumps and loggers."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal Config."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False, default_flow_style=False)
