"""``packed_sdpa``: a core attention that keeps packed sequences apart using ``position_ids`` alone.

Ulysses sequence parallelism (DeepSpeed's ``UlyssesSPAttentionHF``) wraps the model's core attention:
each rank holds a contiguous shard of the tokens, an all-to-all gives every rank the whole sequence
for its share of the heads, and the core attention runs on that. The wrapper drops every 4-D
attention mask (the model built it for the local shard, and a whole-sequence one would be T x T
memory) and hands the core function the gathered whole-sequence ``position_ids`` instead. sdpa
then attends causally across the whole row, so packed sequences (and the padding) would see each
other; flex attention has its mask rebuilt causal-only by the wrapper and no backward on CPU; eager
is refused by DeepSpeed. Flash-attention varlen kernels detect the sequences from ``position_ids``
themselves (GPU only).

This function is the CPU counterpart: it derives the sequences from ``position_ids`` by the rule
transformers uses (``masking_utils.find_packed_sequence_indices``: a position that does not follow
its predecessor by +1 starts a new sequence), builds the block-diagonal causal mask (banded when
the layer has a sliding window) and calls ``F.scaled_dot_product_attention``. The mask is
(T x T) booleans per row, built once per forward and shared by the layers (each layer gets the
same gathered positions; sdpa keeps the mask for backward): right for tests and short rows, not
for 32k tokens, where flash varlen is the kernel to use. Registered with transformers' ``AttentionInterface`` under
:data:`PACKED_SDPA`; a model loaded with ``attn_implementation="packed_sdpa"`` gets no mask from
transformers at all (its mask interface does not know the name), which is what the wrapper wants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megakto.errors import ModelError

__all__ = ["PACKED_SDPA", "document_ids", "packed_causal_mask", "packed_sdpa_attention", "register_packed_sdpa"]

PACKED_SDPA = "packed_sdpa"
_last: list = []  # [(position_ids, sliding_window, mask)] of the latest call: the next layer's mask


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) index of the packed sequence each token belongs to, counted from 0 in every row: a new
    one starts wherever a position does not follow its predecessor by +1 (and at t = 0)."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def packed_causal_mask(position_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: query q sees key k iff k <= q in the same packed sequence (and, with a
    sliding window w, q - k < w, transformers' convention)."""
    docs = document_ids(position_ids)
    t = torch.arange(position_ids.shape[-1], device=position_ids.device)
    distance = t[:, None] - t[None, :]
    mask = (docs[:, :, None] == docs[:, None, :]) & (distance >= 0)
    if sliding_window:
        mask = mask & (distance < sliding_window)
    return mask[:, None]


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                          sliding_window: int | None = None, position_ids: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (B, H, T, D), ``key``/``value``
    (B, H_kv, T, D) -> ((B, T, H, D), None). Whole sequences only (no KV cache): the queries are
    the keys' positions."""
    if position_ids is None:
        raise ModelError(f"attn_implementation={PACKED_SDPA} needs position_ids in every forward (they say where each "
                         "packed sequence starts)")
    if query.shape[2] != key.shape[2]:
        raise ModelError(f"attn_implementation={PACKED_SDPA} scores whole sequences: {query.shape[2]} queries for "
                         f"{key.shape[2]} keys (generation with a cache is not supported)")
    mask = _shared_mask(position_ids.to(query.device), sliding_window)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key-value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                         dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _shared_mask(position_ids: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """:func:`packed_causal_mask`, reused while the positions and the window stay those of the last call."""
    if _last:
        pos, window, mask = _last[0]
        if window == sliding_window and pos.shape == position_ids.shape and torch.equal(pos, position_ids):
            return mask
    mask = packed_causal_mask(position_ids, sliding_window)
    _last[:] = [(position_ids.clone(), sliding_window, mask)]
    return mask


def register_packed_sdpa() -> str:
    """Make :data:`PACKED_SDPA` a valid ``attn_implementation`` in this process (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    return PACKED_SDPA
