"""User-facing errors.

Anything a user can fix (a config key, a data row, a model path) raises a subclass of
:class:`MegaktoError` with a one-line message. The launcher prints that line once and every rank
exits non-zero; no stack trace from deep inside torch.
"""

__all__ = ["MegaktoError", "ConfigError", "DataError", "ModelError"]


class MegaktoError(Exception):
    """An error the user can act on. ``str(err)`` is a single line."""


class ConfigError(MegaktoError):
    """A bad config key or value; the message names the key and what is allowed."""


class DataError(MegaktoError):
    """A bad dataset; the message names the file, the row number and the field."""


class ModelError(MegaktoError):
    """A model folder that cannot be loaded; the message names the path."""
