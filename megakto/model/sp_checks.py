"""Can this model run Ulysses sequence parallelism ``sp`` ways? Checked before any weight is loaded.

Ulysses swaps a sequence shard for a head shard in every attention layer (an all-to-all), so each
rank of the group attends over the whole sequence with ``heads / sp`` of the query heads: the heads
must split evenly, and the key-value heads either split too or are replicated (``sp`` a multiple of
them, DeepSpeed repeats each one). The core attention must keep packed sequences apart from the
gathered ``position_ids``, since the wrapper drops every attention mask
(:mod:`megakto.model.sp_attention`). The model family is checked in
:func:`megakto.model.families.resolve_family_modes`.
"""

from __future__ import annotations

from megakto.errors import ConfigError, ModelError
from megakto.model.packed import uses_flash
from megakto.model.sp_attention import PACKED_SDPA, register_packed_sdpa

__all__ = ["check_sp_config", "check_sp_reference", "sp_attention"]


def check_sp_config(config, sp: int, *, key: str = "model.path") -> None:
    """ModelError naming ``key`` unless ``config``'s attention heads split ``sp`` ways."""
    if sp == 1:
        return
    config = getattr(config, "get_text_config", lambda: config)()
    where = f"{key}: parallel.sp_size={sp}"
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        raise ModelError(f"{where}: config.json has no num_attention_heads, which sequence parallelism divides")
    if heads % sp:
        raise ModelError(f"{where} does not divide the attention heads: num_attention_heads={heads}; choose a "
                         f"parallel.sp_size dividing {heads}")
    kv = getattr(config, "num_key_value_heads", None) or heads
    if kv % sp and sp % kv:
        raise ModelError(f"{where} neither divides the key-value heads nor is a multiple of them: "
                         f"num_key_value_heads={kv}; choose a parallel.sp_size dividing {kv} or a multiple of it "
                         f"that divides {heads}")


def _attention_shape(config) -> tuple[int, int, int]:
    """(attention heads, key-value heads, head_dim) of ``config``."""
    text = getattr(config, "get_text_config", lambda: config)()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return heads, getattr(text, "num_key_value_heads", None) or heads, head_dim


def check_sp_reference(policy_config, ref_config, sp: int, *, key: str = "ref.path") -> None:
    """ModelError naming ``key`` unless the reference's attention has the policy's shape: DeepSpeed
    swaps the attention once per process for one head geometry, which both models then run."""
    if sp == 1:
        return
    want, got = _attention_shape(policy_config), _attention_shape(ref_config)
    if got != want:
        shape = "attention heads {}, key-value heads {}, head_dim {}"
        raise ModelError(f"{key}: parallel.sp_size={sp} runs policy and reference through one Ulysses attention of "
                         f"the policy's shape ({shape.format(*want)}), but the reference has {shape.format(*got)}; "
                         "use a reference of the policy's architecture")


def sp_attention(setting: str, sp: int, *, on_gpu: bool) -> str:
    """The ``model.attn_implementation`` to check and load for ``setting`` under ``sp`` ways of
    sequence parallelism: ``auto`` is flash_attention_2 on GPU (varlen from ``position_ids``) and
    :data:`~megakto.model.sp_attention.PACKED_SDPA` elsewhere; sdpa, flex_attention and eager are
    refused in one line (they would attend across packed sequences or cannot run under Ulysses)."""
    if setting == PACKED_SDPA:
        if sp == 1:
            raise ConfigError(f"model.attn_implementation={PACKED_SDPA} is the core attention of sequence parallelism "
                              "(parallel.sp_size > 1); without it use auto or sdpa")
        return register_packed_sdpa()
    if sp == 1:
        return setting
    if setting == "auto":
        return "flash_attention_2" if on_gpu else register_packed_sdpa()
    if uses_flash(setting):
        return setting
    raise ConfigError(f"model.attn_implementation={setting} with parallel.sp_size={sp}: Ulysses drops the attention "
                      f"mask, so {setting} would let packed sequences and padding attend to each other; use "
                      f"flash_attention_2 (GPU: varlen from position_ids) or {PACKED_SDPA} (sdpa over each packed sequence "
                      "found from position_ids: CPU), or auto for the device's choice")
