"""DeepSpeed's AutoEP (expert parallelism) as megakto runs it.

* :func:`allow_string_registry_keys`: the shim between DeepSpeed 0.19.8's AutoEP and transformers 5.25.
  AutoEP retargets transformers' router-logit recorder to its own router and reads and restores
  ``transformers.utils.output_capturing._CAN_RECORD_REGISTRY`` as a plain ``str``-keyed dict
  (``get(key, default)``, ``registry[key] = value``); transformers 5.25 made it a dict subclass whose
  ``get(model)`` and ``__setitem__(model, value)`` take a model and key it by ``str(model.__class__)``,
  and ``deepspeed.initialize`` then fails with ``_CanRecordRegistry.get() takes 2 positional
  arguments but 3 were given``. The shim lets a ``str`` key through as a plain dict would take it and
  leaves the model-keyed calls alone; it is applied only where the installed registry has that
  model-keyed ``get``.
* :func:`autoep_preset` / :data:`AUTOEP_PRESETS`: which model families DeepSpeed has a preset for.
* :func:`moe_optimizer`: the optimizer (and schedule) as callables, so that DeepSpeed builds them
  after it has replaced the MoE blocks, with the expert parameters in their own ``moe`` groups.
* :func:`expert_groups`: the expert-parallel and expert-data-parallel groups the engine built.
* :func:`hf_expert_weights`: a gathered state dict of an AutoEP model under its Hugging Face names.
"""

from __future__ import annotations

import inspect
import torch

from megakto.distributed import comm
from megakto.model.expert_names import autoep_to_hf

__all__ = ["allow_string_registry_keys", "registry_needs_shim", "autoep_preset", "AUTOEP_PRESETS", "moe_optimizer",
           "expert_groups", "is_expert_parallel", "hf_expert_weights"]


def registry_needs_shim(registry_cls: type) -> bool:
    """Whether ``registry_cls`` is transformers' model-keyed registry (``get(self, model)``, no default)."""
    if registry_cls is dict or not issubclass(registry_cls, dict) or registry_cls.get is dict.get:
        return False
    return list(inspect.signature(registry_cls.get).parameters) == ["self", "model"]  # shimmed: (self, key, *default)


def allow_string_registry_keys(registry_cls: type | None = None) -> bool:
    """Let ``registry_cls`` (default: the installed transformers' ``_CAN_RECORD_REGISTRY`` class) take
    ``str`` keys as a plain dict does; True when the shim was applied now, False when not needed
    (a plain-dict registry, another signature) or already applied. Idempotent."""
    if registry_cls is None:
        try:
            from transformers.utils import output_capturing
        except ImportError:
            return False
        registry_cls = type(getattr(output_capturing, "_CAN_RECORD_REGISTRY", None))
    if "_megakto_str_keys" in vars(registry_cls) or not registry_needs_shim(registry_cls):
        return False
    by_model_get, by_model_set = registry_cls.get, registry_cls.__setitem__

    def get(self, key, *default):
        return dict.get(self, key, *default) if isinstance(key, str) else by_model_get(self, key)

    def setitem(self, key, value):
        if isinstance(key, str):
            dict.__setitem__(self, key, value)
        else:
            by_model_set(self, key, value)

    registry_cls.get, registry_cls.__setitem__, registry_cls._megakto_str_keys = get, setitem, True
    return True


def _presets() -> dict[str, str]:
    """HF ``model_type`` -> DeepSpeed's AutoEP preset name, for every preset DeepSpeed ships."""
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

    return {t: name for name, preset in PRESET_MODELS.items() for t in (preset.hf_model_types or (name,))}


AUTOEP_PRESETS: tuple[str, ...] = tuple(sorted(_presets()))  # the model types AutoEP can convert


def autoep_preset(model_type: str | None) -> str | None:
    """DeepSpeed's AutoEP preset for a Hugging Face ``model_type`` (None: no preset)."""
    return _presets().get(model_type)


def is_expert_parallel(ds_config: dict) -> bool:
    return bool((ds_config.get("expert_parallel") or {}).get("enabled"))


def moe_optimizer(model: torch.nn.Module, groups_fn, make_optimizer):
    """The optimizer as a callable for ``deepspeed.initialize``: AutoEP creates the expert
    parameters inside ``initialize``, so an optimizer built before it would hold the discarded
    full-size experts, and DeepSpeed wants each expert parameter in a group marked ``moe`` (reduced
    over its expert-data-parallel group). ``groups_fn(model)``: megakto's weight-decay groups, taken
    from the converted model and split by ``configure_moe_param_groups`` (each keeps its weight
    decay); ``make_optimizer(groups)``: the optimizer over them."""
    from deepspeed.moe.utils import configure_moe_param_groups

    def build(_params):
        groups = [{**g, "name": f"group{i}"} for i, g in enumerate(groups_fn(model))]
        return make_optimizer(configure_moe_param_groups(groups))

    return build


def expert_groups(ep: int):
    """``(expert-parallel group, expert-data-parallel group)`` of the AutoEP engine just built: the
    ``ep`` ranks that split each layer's experts, and the ranks holding the same experts."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep}"
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def _autoep_layers(module: torch.nn.Module):
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, AutoEPMoELayer)]


def hf_expert_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (this rank's full-size copies under the AutoEP model's names) under the Hugging Face
    names of the fused-expert families (transformers 5): each layer's local experts gathered over its
    expert-parallel group in rank order, then renamed by
    :func:`megakto.model.expert_names.autoep_to_hf` (``w1`` (gate) and ``w3`` (up) stacked back
    into ``gate_up_proj``, ``w2`` as ``down_proj``, ``router.gate`` as the router's ``gate``,
    DeepSpeed's ``gate`` alias dropped). A model without AutoEP layers: ``state`` as it is.
    Collective over each layer's expert-parallel group."""
    from deepspeed.utils import groups

    layers = _autoep_layers(module)
    if not layers:
        return state
    out = dict(state)
    for prefix, layer in layers:
        group = groups._get_expert_parallel_group(layer.ep_group_name)
        for w in ("w1", "w2", "w3"):
            name = f"{prefix}.experts.{w}"
            out[name] = torch.cat(comm.all_gather_object(out[name], group=group), dim=0)
    return autoep_to_hf(out)
