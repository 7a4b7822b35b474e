"""LoRA (Hu et al. 2021) through peft: adapters on the policy, the base weights frozen.

With LoRA the reference model is the base weights themselves: the policy with its adapters off
(peft's ``disable_adapter``) gives π_ref exactly, so no second model is loaded
(:class:`megakto.reference.scorers.AdapterOffReference`). Adapters stay in the model's dtype
(``autocast_adapter_dtype=False``: peft would otherwise upcast them to fp32 beside bf16 weights).

Under ZeRO-3 the base model is already partitioned when the adapters are added; the adapters are
created whole on every rank and the engine partitions them with the rest.
"""

from __future__ import annotations

import torch

__all__ = ["peft_config", "apply_lora", "is_lora", "base_name", "ADAPTER_DIR"]

ADAPTER_DIR = "adapter"  # output_dir/adapter: the adapter alone, in peft's format
_PEFT_PREFIX = "base_model.model."  # a peft causal LM's parameters: base_model (LoraModel).model (the HF model)
_ADAPTER_PARTS = (".lora_", ".modules_to_save.")  # the adapters' own parameters, and modules_to_save's copies
_WRAPPER_PARTS = (".base_layer.", ".original_module.")  # peft's wrappers around a base module


def peft_config(lora):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), modules_to_save=list(lora.modules_to_save) or None)


def apply_lora(model: torch.nn.Module, lora, *, seed: int) -> torch.nn.Module:
    """``model`` wrapped as a peft model with fresh adapters (B = 0: the policy starts as the
    reference); every base weight frozen. A's random init is drawn from ``seed`` on CPU, so every
    rank (and every run with that seed) creates the same adapters: ZeRO-3 then partitions one
    consistent matrix, and a run is reproducible from its config."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config(lora), autocast_adapter_dtype=False)


def is_lora(module: torch.nn.Module) -> bool:
    return hasattr(module, "disable_adapter") and hasattr(module, "peft_config")


def base_name(name: str) -> str | None:
    """The base model's name of the peft-wrapped policy's parameter ``name`` (e.g.
    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``); None for an adapter's own; other names unchanged."""
    if not name.startswith(_PEFT_PREFIX):
        return name
    name = name[len(_PEFT_PREFIX):]
    if any(part in name for part in _ADAPTER_PARTS):
        return None
    for part in _WRAPPER_PARTS:
        name = name.replace(part, ".")
    return name
