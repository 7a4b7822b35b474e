"""Model forward over packed rows -> per-segment completion log-probs.

Packed rows (:func:`megakto.data.packing.pack`) must be attended block-diagonally: a token sees
earlier tokens of its own segment only. transformers 5.x does this itself for models whose mask
goes through ``masking_utils.create_causal_mask`` (Llama, Qwen2/3, Mistral, Gemma, ...): when
``attention_mask`` is None, there is no cache, and ``position_ids`` restart inside a row,
``find_packed_sequence_indices`` turns the restarts into sequence ids and the sdpa, eager and flex
masks become block-diagonal causal. Two conditions the caller must meet:

- ``use_cache=False``: otherwise the model creates an empty cache and the detection is skipped
  (plain causal attention across segments, silently wrong);
- flash-attention kernels detect packing only for a batch of one row (transformers'
  ``_is_packed_sequence``); with more rows each row is plain causal attention and a segment sees
  the segments before it in its row. For them the rows are flattened to (1, R*L); a segment never
  spans rows, so nothing else changes.

Which kernel runs is the run's resolved ``model.attn_implementation``, passed down as ``attn``: it
is never read from the object called, which may be a DeepSpeed engine (whose ``config`` is the
DeepSpeed dict, not the model's).

``attention="mask"`` instead passes an explicit 4D block-diagonal mask built from the segment
ids (sdpa and eager only), for models whose own mask code does not look at ``position_ids``. It
costs R*L*L mask entries, like transformers' own sdpa/eager mask; both still compute the full
L*L scores, so only flash varlen kernels also save the attention FLOPs of packing.
"""

from __future__ import annotations

from typing import Callable

import torch

from megakto.data.packing import PackedBatch
from megakto.errors import ModelError
from megakto.kto.segment_logps import segment_logps

__all__ = ["SegmentLogpsFn", "uses_flash", "for_attention", "check_rows", "packed_attention_mask", "router_request",
           "keep_router_logits", "packed_forward_logps"]

SegmentLogpsFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]
]


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(R, 1, L, L) block-diagonal causal mask: query q sees key k iff k <= q in the same segment.

    Padding (segment -1) is one more block, so every query sees at least itself and no softmax
    row is empty. ``dtype=None`` gives a bool mask (True = attend, what sdpa takes); a float
    dtype gives the additive form (0 or the dtype's minimum, what eager attention adds).
    """
    length = segment_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    mask = mask[:, None]
    if dtype is None:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def uses_flash(attn: str) -> bool:
    """Whether ``attn`` (an ``attn_implementation`` name) is a flash-attention kernel, as transformers
    decides it (``is_flash_attention_requested``: the name contains "flash")."""
    return "flash" in attn


def for_attention(batch: PackedBatch, attn: str) -> PackedBatch:
    """``batch`` as the kernel ``attn`` needs it: one row for flash kernels, as given otherwise."""
    if not uses_flash(attn):
        return batch
    return PackedBatch(*(t.reshape(1, -1) for t in (batch.input_ids, batch.position_ids, batch.completion_mask,
                                                     batch.segment_ids)), batch.num_segments)


def check_rows(attn: str, input_ids: torch.Tensor) -> None:
    """The guard before the model runs: a flash kernel given several rows would let packed sequences
    see each other, silently."""
    if uses_flash(attn) and input_ids.shape[0] != 1:
        raise ModelError(f"attn_implementation={attn} keeps packed sequences apart only in a batch of one row, "
                         f"but {input_ids.shape[0]} rows reached the model; run them through for_attention()")


def router_request(router_logits: list | None) -> dict:
    """The forward's extra arguments when the caller wants the router logits (``router_logits`` a
    list): transformers' ``output_router_logits``. transformers then also computes its own balancing
    loss over every token of the forward (no mask: padding included, a 4-D mask would not fit it);
    megakto discards it and computes its own over the rows' tokens (:mod:`megakto.model.router`)."""
    return {} if router_logits is None else {"output_router_logits": True}


def keep_router_logits(out, router_logits: list | None) -> None:
    """Append the forward output's router logits (one tensor per MoE layer) to ``router_logits``."""
    if router_logits is not None:
        router_logits.extend(getattr(out, "router_logits", None) or ())


def packed_forward_logps(
    model,
    packed: PackedBatch,
    logps_fn: SegmentLogpsFn = segment_logps,
    *,
    attn: str,
    attention: str = "auto",
    flatten: bool | None = None,
    router_logits: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) summed completion log-probs and (S,) token counts, segment i = ``pack()``'s rows[i].

    ``attn``: the model's attention implementation (the run's resolved
    ``model.attn_implementation``). ``attention``: "auto" lets transformers derive the
    block-diagonal mask from ``position_ids``; "mask" passes :func:`packed_attention_mask`
    explicitly. ``flatten`` runs the rows as one (1, R*L) row; None means "for flash-attention
    kernels", which need it. ``router_logits``: a list to receive the router logits of a
    mixture-of-experts model, one tensor per MoE layer (:func:`router_request`).
    """
    input_ids, position_ids = packed.input_ids, packed.position_ids
    completion_mask, segment_ids = packed.completion_mask, packed.segment_ids
    if flatten is None:
        flatten = uses_flash(attn)
    if flatten:
        # A segment never spans rows, so row ends become ordinary segment boundaries.
        input_ids, position_ids, completion_mask, segment_ids = (
            t.reshape(1, -1) for t in (input_ids, position_ids, completion_mask, segment_ids)
        )
    if attention == "auto":
        mask = None
    elif attention == "mask":
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"attention='mask' supports attn_implementation sdpa or eager, not {attn!r}")
        if router_logits is not None:  # transformers' own balancing loss reads the mask as 2-D
            raise ValueError("router logits need attention='auto': with them transformers computes its balancing "
                             "loss from the attention mask, which fails on a 4-D mask")
        # Eager adds the mask to the scores, so it must be additive; sdpa takes bool.
        dtype = next(model.get_input_embeddings().parameters()).dtype if attn == "eager" else None
        mask = packed_attention_mask(segment_ids, dtype)
    else:
        raise ValueError(f"attention must be 'auto' or 'mask'; got {attention!r}")
    check_rows(attn, input_ids)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False,
                **router_request(router_logits))
    keep_router_logits(out, router_logits)
    return logps_fn(out.logits, input_ids, completion_mask, segment_ids, packed.num_segments)
