"""Checks and loaders for the model folder that fail with one actionable line."""

from __future__ import annotations

import os
import weakref

from transformers import AutoConfig, AutoTokenizer

from megakto.errors import ModelError

__all__ = ["check_model_path", "load_tokenizer", "padding_note"]

# Tokenizers that load_tokenizer gave EOS as their pad token: a weak set rather than an attribute,
# so nothing of ours travels with the tokenizer (pickled into datasets' map, saved by an export).
_PADDED_WITH_EOS = weakref.WeakSet()


def check_model_path(path: str, *, key: str, trust_remote_code: bool) -> None:
    """Fail early (before any engine is built) if ``path`` is not a loadable causal-LM folder."""
    if not path:
        raise ModelError(f"{key} is empty: set it to a local Hugging Face model folder (or a hub name)")
    looks_local = os.path.sep in path or path.startswith(".") or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise ModelError(f"{key}={path}: no such model folder")
    if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{key}={path}: folder has no config.json; expected a Hugging Face model folder")
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types; the user needs the one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ModelError(f"{key}={path}: cannot load the model config: {first}") from None


def load_tokenizer(path: str, *, key: str, trust_remote_code: bool):
    """AutoTokenizer with an EOS token checked for, and EOS as the pad token when it has none
    (see :func:`padding_note`)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ModelError(f"{key}={path}: cannot load the tokenizer: {first}") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{key}={path}: the tokenizer has no eos_token; KTO completions end with EOS")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere
        _PADDED_WITH_EOS.add(tokenizer)
    return tokenizer


def padding_note(tokenizer) -> str | None:
    """The line to log when :func:`load_tokenizer` made EOS the pad token, else None."""
    if tokenizer not in _PADDED_WITH_EOS:
        return None
    return (f"tokenizer {type(tokenizer).__name__}({tokenizer.name_or_path}) has no pad token: "
            f"padding uses its EOS token {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), "
            f"masked out of every loss and log-prob")
