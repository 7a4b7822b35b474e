"""Checks and loaders for the model folder that fail with one actionable line.

:func:`model_settings` asks transformers, before any weights load, whether the configured
attention implementation and log-prob mode can run on the model (and its family in the run's
parallel mode, :mod:`megakto.model.families`): the model class is built on the
meta device (no memory, no weights), which runs transformers' own attention checks, so ``auto``
resolves to what ``from_pretrained`` would pick (sdpa where the class supports it, else eager) and
an explicit choice the class or the installed packages cannot run is one line listing those that
can. Packed rows stay block-diagonal in each of them (see :mod:`megakto.model.packed`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import weakref
from typing import NamedTuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megakto.errors import ConfigError, ModelError
from megakto.model.families import resolve_family_modes, router_aux_coef, router_aux_note
from megakto.model.sp_checks import check_sp_config
from megakto.model.tp_checks import check_tp_config

__all__ = ["ModelSettings", "check_model_path", "model_settings", "check_model_settings", "attn_choices", "load_tokenizer",
           "outside_zero3", "padding_note"]

# Implementations whose availability is asked of transformers for the error message; any other
# name transformers accepts (e.g. a hub kernel) is passed through as well.
ATTN_CANDIDATES = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")

# Tokenizers that load_tokenizer gave EOS as their pad token: a weak set rather than an attribute,
# so nothing of ours travels with the tokenizer (pickled into datasets' map, saved by an export).
_PADDED_WITH_EOS = weakref.WeakSet()


def check_model_path(path: str, *, key: str, trust_remote_code: bool, tp: int = 1, sp: int = 1):
    """Fail early (before any engine is built) if ``path`` is not a loadable causal-LM folder, or
    one that does not split ``tp`` ways (:func:`megakto.model.tp_checks.check_tp_config`) or ``sp``
    ways (:func:`megakto.model.sp_checks.check_sp_config`); returns its config."""
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
    check_sp_config(config, sp, key=f"{key}={path}")
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


@contextlib.contextmanager
def outside_zero3():
    """Build plain, whole HF models in a process whose engines use ZeRO-3 (the export at the end
    of training, a meta-device model after an engine exists). While an ``HfDeepSpeedConfig`` is
    alive, transformers wraps every model construction in ``zero.Init``, a collective that would
    wait for the other ranks forever (and cannot copy meta tensors); its module-level reference is
    the only switch, so it is cleared here and put back after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _meta_model(config, attn: str | None, trust_remote_code: bool):
    """The causal-LM class of ``config`` built on the meta device with ``attn`` (None = transformers'
    default); raises what transformers raises for an implementation it cannot run."""
    with torch.device("meta"), outside_zero3():
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


class ModelSettings(NamedTuple):
    """What :func:`model_settings` resolved: the attention implementation, the log-prob mode and the
    lines to log about them."""

    attn: str
    logps: str
    notes: list[str]
    router_aux_coef: float = 0.0  # kto.router_aux_coef resolved for the policy (0: no balancing loss)


def model_settings(path: str, *, attn_implementation: str, logps: str, trust_remote_code: bool,
                   ref_path: str | None = None, tp: int = 1, pp: int = 1, packing: bool = True,
                   router_aux: float | None = 0.0, sp: int = 1) -> ModelSettings:
    """The attention implementation and log-prob mode to load the policy (and the reference at
    ``ref_path``) with, checked against each model's family (:mod:`megakto.model.families`).

    ``auto`` attention is what transformers picks for the model; when policy and reference resolve
    differently, eager, which every model runs. ``auto`` log-probs are chunked unless the family
    changes its logits after the head. ``router_aux``: ``kto.router_aux_coef``, resolved for the
    policy (None = its config's ``router_aux_loss_coef``; :func:`~megakto.model.families.router_aux_coef`).
    Raises a one-line ConfigError for a choice, or a parallel mode or packing, that a model cannot
    run. No weights are read.
    """
    paths = [("model.path", path)]
    if ref_path and ref_path != path:
        paths.append(("ref.path", ref_path))
    picked, modes, notes, coef = [], [], [], 0.0
    for key, p in paths:
        try:
            config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
        except Exception as err:  # transformers raises many types; the user needs the one line
            raise ModelError(f"{key}={p}: cannot load the model config: {_first_sentence(err)}") from None
        model = _resolve_attn(config, attn_implementation, key=key, path=p,
                              trust_remote_code=trust_remote_code)
        family = resolve_family_modes(model, key=key, path=p, logps=logps, tp=tp, pp=pp, packing=packing, sp=sp)
        picked.append(str(model.config._attn_implementation))
        modes.append(family.logps)
        notes += [n for n in family.notes if n not in notes]
        if key == "model.path":  # the balancing loss is the policy's
            coef = router_aux_coef(model, router_aux, key=key, path=p)
            notes += [n for n in [router_aux_note(model, coef, router_aux)] if n]
    attn = "eager" if attn_implementation == "auto" and len(set(picked)) > 1 else picked[0]
    # Both models are scored by one log-prob function: full serves every head, chunked only some.
    return ModelSettings(attn, "full" if "full" in modes else modes[0], notes, coef)


def check_model_settings(path: str, *, attn_implementation: str, logps: str, trust_remote_code: bool,
                         ref_path: str | None = None) -> str:
    """The attention implementation of :func:`model_settings` (the checks without a parallel mode)."""
    return model_settings(path, attn_implementation=attn_implementation, logps=logps,
                          trust_remote_code=trust_remote_code, ref_path=ref_path).attn


def padding_note(tokenizer) -> str | None:
    """The line to log when :func:`load_tokenizer` made EOS the pad token, else None."""
    if tokenizer not in _PADDED_WITH_EOS:
        return None
    return (f"tokenizer {type(tokenizer).__name__}({tokenizer.name_or_path}) has no pad token: "
            f"padding uses its EOS token {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), "
            f"masked out of every loss and log-prob")
