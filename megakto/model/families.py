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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megakto.errors import ConfigError

__all__ = ["FamilyModes", "logit_transform", "sequence_mixers", "moe_block_classes", "resolve_family_modes"]

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
