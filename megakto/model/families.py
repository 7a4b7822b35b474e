"""What a model family can run, read from its config (and its class built on the meta device) before
any weights load: the per-family half of the start-up checks.

Three properties decide which of megakto's modes a family runs in:

* **Logits changed after the output head** (Gemma 2/3 soft-capping, Cohere's and Granite's logit
  scales). Chunked log-probs read the head's own output, so such a model needs ``model.logps=full``
  (the model's ordinary logits); ``auto``, the default, resolves to it. Tensor parallelism and
  pipelines score with the chunked (vocabulary-parallel) head only, so for such a model they are
  refused, naming ZeRO-3 instead.
* **Layers that mix tokens along the sequence outside attention** (Gated DeltaNet linear attention
  in Qwen3-Next and Qwen3.5, Mamba blocks): packed rows are separated by restarting position ids,
  which only attention masks look at; a recurrent or convolutional layer would carry state from
  one packed row into the next. Such a model needs ``data.packing=false`` (one right-padded
  sequence per row: the padding comes after the sequence, so a causal mixer never sees it).
* **Routed experts** (Mixtral, Qwen2/3-MoE, Qwen3.5-MoE, Qwen3-Next, OLMoE, ...): ZeRO-3 prefetches
  parameters in the order modules ran before, which routing changes from batch to batch; the MoE
  block is made a ZeRO-3 *leaf* (all its experts gathered on entry) by :func:`moe_block_classes`.
  Their routers' balancing loss (``kto.router_aux_coef``, :mod:`megakto.kto.router_aux`) needs the
  router logits, which a model reports through transformers' ``output_router_logits``, and the
  top-k (``num_experts_per_tok``): :func:`router_aux_coef` resolves the coefficient against them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from megakto.errors import ConfigError

__all__ = ["FamilyModes", "logit_transform", "sequence_mixers", "moe_block_classes", "EXPERT_COUNT_KEYS", "num_experts", "router_top_k",
           "router_aux_coef",
           "router_aux_note", "resolve_family_modes"]

# Config fields of models that change the logits after the output head, with their neutral value.
_LOGIT_TRANSFORMS = (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0))
# layer_types entries that are attention (the rest mix tokens some other way).
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "attention", "chunked_attention"}


@dataclass
class FamilyModes:
    """What :func:`resolve_family_modes` decided: the log-prob mode to run and the lines to log."""

    logps: str
    notes: list[str] = field(default_factory=list)


def logit_transform(config) -> str | None:
    """``name=value`` of the first transform ``config`` applies to the logits after the head; None if none."""
    text = config.get_text_config()
    for name, neutral in _LOGIT_TRANSFORMS:
        value = getattr(text, name, neutral)
        if value is not None and value != neutral:
            return f"{name}={value}"
    return None


def sequence_mixers(config) -> list[str]:
    """The kinds of layer in ``config`` that mix tokens outside attention (e.g. ``linear_attention``)."""
    text = config.get_text_config()
    kinds = set(getattr(text, "layer_types", None) or [])
    return sorted(k for k in kinds if k not in _ATTENTION_LAYERS)


def moe_block_classes(model: torch.nn.Module) -> list[type]:
    """The classes of ``model``'s mixture-of-experts blocks: the modules holding an ``experts`` child
    (and so the router that picks among them), outermost only."""
    found: list[type] = []
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, torch.nn.Module) and type(module) not in found:
            found.append(type(module))
    return found


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def num_experts(config) -> int | None:
    """The routed experts per MoE layer of a Hugging Face config (None: not a mixture of experts)."""
    text = config.get_text_config()
    for key in EXPERT_COUNT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def router_top_k(model) -> int | None:
    """The experts each token is routed to (``num_experts_per_tok``), None when the model does not say."""
    top_k = getattr(model.config.get_text_config(), "num_experts_per_tok", None)
    return top_k if isinstance(top_k, int) and top_k > 0 else None


def router_aux_coef(model, setting: float | None, *, key: str, path: str) -> float:
    """``kto.router_aux_coef`` for ``model`` (built on the meta device): ``setting``, or when None the
    model config's ``router_aux_loss_coef`` (0 for a model without one, e.g. a dense model). Raises
    a one-line ConfigError for a non-zero coefficient the model cannot run: no routed experts, or
    no router logits reported (transformers' ``output_router_logits``) or no top-k to count with."""
    name = type(model).__name__
    if not moe_block_classes(model):
        if setting:
            raise ConfigError(f"kto.router_aux_coef={setting:g} is the balancing loss of a mixture-of-experts "
                              f"router, but {name} ({key}={path}) has no routed experts; remove it or set 0")
        return 0.0
    coef = setting if setting is not None else getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0)
    coef = float(coef or 0.0)
    reports = "output_router_logits" in inspect.signature(type(model).forward).parameters
    if coef and not (reports and router_top_k(model)):
        source = "" if setting is not None else " (its config's router_aux_loss_coef)"
        raise ConfigError(f"kto.router_aux_coef={coef:g}{source}: {name} ({key}={path}) does not report its router "
                          "logits and top-k (transformers' output_router_logits, num_experts_per_tok) to compute "
                          "the balancing loss from; set kto.router_aux_coef=0")
    return coef


def router_aux_note(model, coef: float, setting: float | None) -> str | None:
    """The start-up line about the balancing loss :func:`router_aux_coef` resolved (None when off)."""
    if not coef:
        return None
    source = " (the model config's router_aux_loss_coef)" if setting is None else ""
    return (f"router balancing loss: kto.router_aux_coef={coef:g}{source}, top-{router_top_k(model)} routing, "
            "over the target rows' tokens")


def resolve_family_modes(model, *, key: str, path: str, logps: str, tp: int, pp: int, packing: bool,
                         sp: int = 1) -> FamilyModes:
    """The family's half of the start-up checks for ``model`` (built on the meta device, no weights):
    ``model.logps`` (``auto`` resolved), then the parallel mode and packing against the family.
    Raises a one-line ConfigError naming the family, the mode and what to use instead."""
    name = type(model).__name__
    transform = logit_transform(model.config)
    notes = []
    if logps == "auto":
        logps = "full" if transform else "chunked"
        if transform:
            notes.append(f"log-probs: full (model.logps=auto: {name} changes the logits after the output head, "
                         f"{transform}, which chunked log-probs would skip)")
    elif logps == "chunked" and transform:
        raise ConfigError(f"model.logps=chunked cannot be used with {name} ({key}={path}): it changes the logits "
                          f"after the output head ({transform}), which chunked log-probs skip; set model.logps=full "
                          "(or auto)")
    if transform and (tp > 1 or pp > 1):  # an explicit model.logps=full was refused with the config
        mode = f"parallel.tp_size={tp}" if tp > 1 else f"parallel.pp_size={pp}"
        raise ConfigError(f"{name} ({key}={path}) cannot run with {mode}: it changes the logits after the output "
                          f"head ({transform}), and {mode} scores with the chunked vocabulary-parallel head, which "
                          "reads the head's own output; run it under ZeRO-3 (parallel.tp_size=1, "
                          "parallel.pp_size=1)")
    if transform and sp > 1:
        raise ConfigError(f"{name} ({key}={path}) cannot run with parallel.sp_size={sp}: it changes the logits after "
                          f"the output head ({transform}), and each rank scores its shard of the sequence with the "
                          "chunked head, which reads the head's own output; set parallel.sp_size=1")
    mixers = sequence_mixers(model.config)
    if mixers and sp > 1:
        raise ConfigError(f"{name} ({key}={path}) cannot run with parallel.sp_size={sp}: its {', '.join(mixers)} "
                          "layers mix tokens along the sequence outside attention, and Ulysses splits only the "
                          "attention (each rank would run them over its own shard); set parallel.sp_size=1")
    if mixers and packing:
        raise ConfigError(f"data.packing=true cannot be used with {name} ({key}={path}): its "
                          f"{', '.join(mixers)} layers mix tokens along the sequence outside attention, so packed "
                          "rows would leak into each other; set data.packing=false (one right-padded sequence "
                          "per row)")
    return FamilyModes(logps, notes)
