"""Config values coerced by their field's annotation, in one place (:func:`_coerce`).

A string is parsed the same way whether it came from the command line or from YAML, because PyYAML
keeps YAML 1.1 rules and reads ``lr: 1e-5`` as the *string* ``"1e-5"``. A value that does not fit
raises :class:`_Bad`; the loader turns that into a one-line error naming the key, using
:func:`_describe` for what is allowed.
"""

from typing import Any, Literal, Union, get_args, get_origin

import yaml

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_NULL = {"null", "none", "~"}


class _Bad(Exception):
    """Internal: the value does not fit the type; the caller adds the key."""


def _describe(tp: Any, verbose: bool = True) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        choices = ", ".join(repr(c) for c in get_args(tp))
        return choices if len(get_args(tp)) == 1 else f"one of {choices}"
    if origin is Union:
        return " or ".join(_describe(a, verbose) for a in get_args(tp))
    if origin is list:
        return f"list of {_describe(get_args(tp)[0], verbose)}"
    if tp is bool and verbose:
        return "bool (true/false/1/0/yes/no)"
    return tp.__name__


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ``_Bad``. Strings are parsed as text."""
    origin = get_origin(tp)
    text = value.strip() if isinstance(value, str) else None

    if origin is Union:
        args = get_args(tp)
        if type(None) in args and (value is None or (text is not None and text.lower() in _NULL)):
            return None
        # Literal arms first, so "auto" is not tried as a float.
        arms = [a for a in args if a is not type(None)]
        for arm in sorted(arms, key=lambda a: get_origin(a) is not Literal):
            try:
                return _coerce(value, arm)
            except _Bad:
                pass
        raise _Bad
    if origin is Literal:
        if value in get_args(tp) or text in get_args(tp):
            return text if text is not None else value
        raise _Bad
    if origin is list:
        (elem,) = get_args(tp)
        if text is not None:
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise _Bad from None
            else:
                value = [p.strip() for p in text.split(",") if p.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Bad
        return [_coerce(v, elem) for v in value]
    if tp is bool:
        if text is not None:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise _Bad
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _Bad
    if tp is int:
        if text is not None:
            try:
                return int(text)
            except ValueError:
                raise _Bad from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Bad
    if tp is float:
        if text is not None:
            try:
                return float(text)
            except ValueError:
                raise _Bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad
    raise TypeError(f"unsupported config annotation {tp!r}")


def _literal_choices(tp: Any) -> list[str]:
    if get_origin(tp) is Literal:
        return [c for c in get_args(tp) if isinstance(c, str)]
    if get_origin(tp) is Union:
        return [c for a in get_args(tp) for c in _literal_choices(a)]
    return []
