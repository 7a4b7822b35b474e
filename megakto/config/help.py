"""The ``--help-config`` text: every dotted key with its type, default and help, from the schema."""

import dataclasses
import json

from megakto.config.coerce import _describe
from megakto.config.schema import _leaf_keys

__all__ = ["config_help"]


def config_help() -> str:
    """One line per dotted key: ``key: type = default  help``."""
    rows = []
    for key, tp, f in _leaf_keys():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # Defaults are shown as they are written in YAML (null, true, [0.9, 0.999]).
        left = f"{key}: {_describe(tp, verbose=False)} = {json.dumps(default)}"
        rows.append((left, f.metadata["help"]))
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"{left.ljust(width)}  {help}" for left, help in rows)
