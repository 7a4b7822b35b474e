"""Checks and loaders for the model folder that fail with one actionable line.

:func:`check_model_settings` asks transformers, before any weights load, whether the configured
attention implementation and log-prob mode can run on the model: the model class is built on the
meta device (no memory, no weights), which runs transformers' own attention checks, so ``auto``
resolves to what ``from_pretrained`` would pick (sdpa where the class supports it, else eager) and
an explicit choice the class or the installed packages cannot run is one line listing those that
can. Packed rows stay block-diagonal in each of them (see :mod:`megakto.model.packed`).
"""

from __future__ import annotations

import copy
import os
import weakref

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megakto.errors import ConfigError, ModelError
from megakto.model.tp_checks import check_tp_config

__all__ = ["check_model_path", "check_model_settings", "attn_choices", "load_tokenizer", "padding_note"]

# Implementations whose availability is asked of transformers for the error message; any other
# name transformers accepts (e.g. a hub kernel) is passed through as well.
ATTN_CANDIDATES = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")

# Config fields of models that change the logits after the output head (Gemma 2/3 soft-capping,
# Cohere's and Granite's logit scales); chunked log-probs read the head's own output.
_LOGIT_TRANSFORMS = (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0))

# Tokenizers that load_tokenizer gave EOS as their pad token: a weak set rather than an attribute,
# so nothing of ours travels with the tokenizer (pickled into datasets' map, saved by an export).
_PADDED_WITH_EOS = weakref.WeakSet()


def check_model_path(path: str, *, key: str, trust_remote_code: bool, tp: int = 1):
    """Fail early (before any engine is built) if ``path`` is not a loadable causal-LM folder, or
    one that does not split ``tp`` ways (:func:`megakto.model.tp_checks.check_tp_config`); returns
    its config."""
    if not path:
        raise ModelError(f"{key} is empty: set it to a local Hugging Face model folder (or a hub name)")
    looks_local = os.path.sep in path or path.startswith(".") or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise ModelError(f"{key}={path}: no such model folder")
    if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{key}={path}: folder has no config.json; expected a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types; the user needs the one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ModelError(f"{key}={path}: cannot load the model config: {first}") from None
    check_tp_config(config, tp, key=f"{key}={path}")
    return config


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


def _first_sentence(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return text.split(". ")[0].rstrip(".")


def _meta_model(config, attn: str | None, trust_remote_code: bool):
    """The causal-LM class of ``config`` built on the meta device with ``attn`` (None = transformers'
    default); raises what transformers raises for an implementation it cannot run."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn,
                                                trust_remote_code=trust_remote_code)


def attn_choices(model) -> list[str]:
    """The implementations of :data:`ATTN_CANDIDATES` transformers would run for ``model`` here."""
    ok = []
    for name in ATTN_CANDIDATES:
        try:
            model.get_correct_attn_implementation(name, is_init_check=True)
        except (ValueError, ImportError):
            continue
        ok.append(name)
    return ok


def _resolve_attn(config, setting: str, *, key: str, path: str, trust_remote_code: bool):
    """The meta-device model with the implementation transformers resolves ``setting`` to."""
    def build(attn):
        try:
            return _meta_model(config, attn, trust_remote_code)
        except Exception as err:  # remote code or an unknown architecture: the user needs the one line
            raise ModelError(f"{key}={path}: cannot build the model: {_first_sentence(err)}") from None

    if setting == "auto":
        return build(None)
    try:
        return _meta_model(config, setting, trust_remote_code)
    except (ValueError, ImportError) as err:  # what transformers raises for an unusable implementation
        eager = build("eager")
        raise ConfigError(
            f"model.attn_implementation={setting} cannot run {type(eager).__name__} ({key}={path}): "
            f"{_first_sentence(err)}; choices that work here: {', '.join(['auto'] + attn_choices(eager))}"
        ) from None


def _check_logps(model, mode: str, *, key: str, path: str) -> None:
    if mode != "chunked":
        return
    text = model.config.get_text_config()
    for name, neutral in _LOGIT_TRANSFORMS:
        value = getattr(text, name, neutral)
        if value is not None and value != neutral:
            raise ConfigError(
                f"model.logps=chunked cannot be used with {type(model).__name__} ({key}={path}): it changes "
                f"the logits after the output head ({name}={value}), which chunked log-probs skip; "
                "set model.logps=full"
            )


def check_model_settings(path: str, *, attn_implementation: str, logps: str, trust_remote_code: bool,
                         ref_path: str | None = None) -> str:
    """The attention implementation to load the policy (and the reference at ``ref_path``) with.

    ``auto`` is what transformers picks for the model; when policy and reference resolve
    differently, eager, which every model runs. Raises a one-line ConfigError for a choice, or a
    ``model.logps=chunked``, that the model cannot run. No weights are read.
    """
    paths = [("model.path", path)]
    if ref_path and ref_path != path:
        paths.append(("ref.path", ref_path))
    picked = []
    for key, p in paths:
        try:
            config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
        except Exception as err:  # transformers raises many types; the user needs the one line
            raise ModelError(f"{key}={p}: cannot load the model config: {_first_sentence(err)}") from None
        model = _resolve_attn(config, attn_implementation, key=key, path=p,
                              trust_remote_code=trust_remote_code)
        _check_logps(model, logps, key=key, path=p)
        picked.append(str(model.config._attn_implementation))
    return "eager" if attn_implementation == "auto" and len(set(picked)) > 1 else picked[0]


def padding_note(tokenizer) -> str | None:
    """The line to log when :func:`load_tokenizer` made EOS the pad token, else None."""
    if tokenizer not in _PADDED_WITH_EOS:
        return None
    return (f"tokenizer {type(tokenizer).__name__}({tokenizer.name_or_path}) has no pad token: "
            f"padding uses its EOS token {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), "
            f"masked out of every loss and log-prob")
