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

This function is the CPU counterpart: it finds the sequences from ``position_ids`` by the rule
transformers uses (``masking_utils.find_packed_sequence_indices``: a position that does not follow
its predecessor by +1 starts a new sequence) and runs ``F.scaled_dot_product_attention`` causally
on each sequence alone (its queries, keys and values only), so no T x T mask and no attention
weights across sequences exist: memory and work are those of the sequences, as with varlen
kernels. A layer with a sliding window gets a banded mask per sequence (its own length squared).
Registered with transformers' ``AttentionInterface`` under :data:`PACKED_SDPA`; a model loaded with
``attn_implementation="packed_sdpa"`` gets no mask from transformers at all (its mask interface does
not know the name), which is what the wrapper wants. One sdpa call per sequence and layer: for
tests and CPU runs; on GPU flash varlen does the same in one kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megakto.errors import ModelError

__all__ = ["PACKED_SDPA", "document_ids", "document_spans", "packed_causal_mask", "packed_sdpa_attention",
           "register_packed_sdpa"]

PACKED_SDPA = "packed_sdpa"


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


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of ``position_ids`` (B, T), the ``(start, end)`` of each packed sequence in order."""
    out = []
    for row in position_ids:
        step = torch.diff(row, prepend=row[:1])  # 0 at t = 0: always a start
        starts = torch.nonzero(step != 1).flatten().tolist() + [row.shape[0]]
        out.append(list(zip(starts[:-1], starts[1:])))
    return out


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
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key-value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    p = dropout if module.training else 0.0
    rows = []
    for b, spans in enumerate(document_spans(position_ids.expand(query.shape[0], -1))):
        parts = []
        for start, end in spans:
            q, k, v = (t[b:b + 1, :, start:end] for t in (query, key, value))
            band = None
            if sliding_window and end - start > sliding_window:
                band = packed_causal_mask(torch.arange(end - start, device=q.device)[None], sliding_window)
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=p, scale=scaling,
                                                        is_causal=band is None))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> str:
    """Make :data:`PACKED_SDPA` a valid ``attn_implementation`` in this process (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    return PACKED_SDPA
