"""Model forward -> per-sequence completion log-probs, for packed batches.

Every batch is a :class:`~megakto.data.packing.PackedBatch`: sequences laid end to end in rows,
``position_ids`` restarting at each one, so attention stays inside a sequence (transformers builds
the block-diagonal mask from the positions when no attention mask and no cache are given). A
padded batch is the special case of one sequence per row.

Two ways to turn hidden states into log-probs, same result:

* ``chunked`` (default): ``lm_head`` runs only on the positions whose next token is a completion
  token — prompt and padding positions get no logits at all — and in chunks of tokens with a
  recomputing backward, so no (tokens × vocabulary) tensor exists whole. The output head's forward
  is swapped for the call, which keeps ZeRO-3's parameter gathering in play. A head split into
  vocabulary blocks (:mod:`megakto.model.vocab_blocks`) is scored block by block.
* ``full``: the model's ordinary logits, then per-segment sums; for models whose head cannot be
  swapped (a bias, or logits changed after the head).

Under tensor parallelism the output head is DeepSpeed's vocabulary-parallel ``VocabParallelLinear``:
each rank of the tensor-parallel group holds rows ``[vocab_start_index, vocab_end_index)``, and the
chunked log-probs reduce the log-sum-exp over the group (Megatron's vocab-parallel cross-entropy),
so no rank ever holds a full row of logits. The reductions come in as two callables built by the
parallel side (:func:`megakto.distributed.vocab_parallel.group_reducers`): model code never sees a
process group.
"""

from __future__ import annotations

from functools import partial

import torch

from megakto.data.collate import Batch
from megakto.data.packing import PackedBatch
from megakto.errors import ModelError
from megakto.kto.chunked_logps import Reducer, token_logps
from megakto.kto.logps import sequence_logps
from megakto.kto.segment_logps import segment_logps
from megakto.model.lm_head import check_head_output, output_head, replaced_output_head
from megakto.model.packed import (check_rows, for_attention, keep_router_logits, packed_forward_logps, router_request,
                                  uses_flash)
from megakto.model.vocab_blocks import BlockedHead, blocked_token_logps

__all__ = ["packed_completion_logps", "completion_logps", "logps_function", "chunk_tokens_for", "segment_head",
           "LOGITS_BLOCK_ELEMENTS", "uses_flash", "for_attention", "completion_token_counts", "VocabReducers"]

# ``(reduce_max, reduce_sum)`` over the ranks a vocabulary-parallel head is split across, each an
# all-reduce that returns its tensor; ``(None, None)`` when there is nothing to reduce over.
VocabReducers = tuple[Reducer | None, Reducer | None]

# One (chunk × vocabulary) block of fp32 logits is at most this many elements (64 MiB), whatever
# the vocabulary size: memory beyond the weights stays flat as V grows.
LOGITS_BLOCK_ELEMENTS = 1 << 24


def chunk_tokens_for(vocab_size: int) -> int:
    return max(16, LOGITS_BLOCK_ELEMENTS // max(1, vocab_size))


def _scored(batch: PackedBatch):
    """Positions t whose successor t+1 is a completion token of the same segment."""
    seg = batch.segment_ids
    mask = (batch.completion_mask[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
    return mask, batch.input_ids[:, 1:][mask], seg[:, 1:][mask]


def completion_token_counts(batch: PackedBatch) -> torch.Tensor:
    """(S,) scored completion tokens of each segment."""
    return torch.bincount(_scored(batch)[2], minlength=batch.num_segments)


def _vocab_shard(model, head: torch.nn.Module, reducers: VocabReducers):
    """``(vocab_start, reduce_max, reduce_sum)`` for this head: its rows of the vocabulary and the
    ``reducers`` when it is vocabulary-parallel; ``(0, None, None)`` for a whole head."""
    start = getattr(head, "vocab_start_index", None)
    if start is not None:
        reduce_max, reduce_sum = reducers
        if reduce_sum is None:
            raise ModelError(f"the output head holds vocabulary rows {start}..{head.vocab_end_index} only, but no "
                             "tensor-parallel group was given to reduce over; set parallel.tp_size")
        return int(start), reduce_max, reduce_sum
    config = getattr(getattr(model, "module", model), "config", None)
    weight = head.weight
    rows = tuple(getattr(weight, "ds_shape", weight.shape))[0]
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and rows < vocab:
        raise ModelError(f"the output head has {rows} rows for a vocabulary of {vocab} and says nothing of which; "
                         "log-probs over part of the vocabulary would be wrong")
    return 0, None, None


def packed_completion_logps(model, batch: PackedBatch, *, attn: str, mode: str = "chunked",
                            chunk_tokens: int | None = None, reducers: VocabReducers = (None, None),
                            router_logits: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) summed completion log-probs (fp32) and (S,) completion token counts, segment order.

    ``model`` is an HF causal LM or a DeepSpeed engine wrapping one (called as given, so the
    engine's hooks run). ``attn``: its attention implementation (the run's resolved
    ``model.attn_implementation``), which decides the rows' layout (:func:`for_attention`).
    ``reducers``: ``(reduce_max, reduce_sum)`` over the tensor-parallel group a vocabulary-parallel
    head is split across (``(None, None)`` without tensor parallelism). ``router_logits``: a list
    to receive a mixture-of-experts model's router logits, one (tokens, experts) tensor per MoE
    layer (transformers' ``output_router_logits``; :mod:`megakto.model.router`); None (the default)
    asks the model for nothing more than before.
    """
    if mode == "full":
        return packed_forward_logps(model, batch, segment_logps, attn=attn, router_logits=router_logits)
    if mode != "chunked":
        raise ValueError(f"unknown log-prob mode {mode!r}; expected chunked or full")
    batch = for_attention(batch, attn)
    mask, targets, seg_of = _scored(batch)
    n = batch.num_segments
    n_tokens = torch.bincount(seg_of, minlength=n)
    head, head_fn = segment_head(model, mask, targets, seg_of, n, chunk_tokens=chunk_tokens, reducers=reducers)
    check_rows(attn, batch.input_ids)
    with replaced_output_head(head, head_fn) as state:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                    use_cache=False, **router_request(router_logits))
    keep_router_logits(out, router_logits)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return check_head_output(model, logits, state, n), n_tokens


def segment_head(model, mask: torch.Tensor, targets: torch.Tensor, seg_of: torch.Tensor, n: int, *,
                 chunk_tokens: int | None = None, reducers: VocabReducers = (None, None), shifted: bool = True):
    """``(head, forward)``: ``model``'s output head and the forward to swap in for one call
    (:func:`~megakto.model.lm_head.replaced_output_head`), which returns the (n, 1, 1) per-segment
    sums of the log-probs of ``targets`` at the positions ``mask`` picks (segment ``seg_of``).
    ``shifted``: the mask covers positions 0..L-2 of the head's input (the targets being the next
    tokens, as :func:`_scored` gives them); otherwise all L positions (labels shifted beforehand, as
    in a sequence shard)."""

    def chunk_for(rows: int) -> int:
        return chunk_tokens or chunk_tokens_for(rows)

    def head_fn(hidden: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
        scored = (hidden[:, :-1] if shifted else hidden)[mask]
        if isinstance(head, BlockedHead):
            tok = blocked_token_logps(head, scored, targets, chunk_for)
        else:
            tok = token_logps(scored, head.weight, targets, chunk_size=chunk_for(head.weight.shape[0]),
                              vocab_start=start, reduce_max=reduce_max, reduce_sum=reduce_sum)
        return torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, seg_of, tok).view(n, 1, 1)

    head = output_head(model)
    start, reduce_max, reduce_sum = (0, None, None) if isinstance(head, BlockedHead) else _vocab_shard(model, head, reducers)
    return head, head_fn


def logps_function(mode: str, chunk_tokens: int | None = None, *, attn: str,
                   reducers: VocabReducers = (None, None)):
    """The configured log-prob function, ``f(model, batch) -> (logps, n_tokens)``, for a model whose
    attention implementation is ``attn`` (resolved once at start-up: the function is called with
    DeepSpeed engines, which do not expose the model's config). ``reducers``: as in
    :func:`packed_completion_logps`."""
    return partial(packed_completion_logps, attn=attn, mode=mode, chunk_tokens=chunk_tokens, reducers=reducers)


def completion_logps(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth on a right-padded batch: full logits, then :func:`megakto.kto.sequence_logps`."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return sequence_logps(out.logits, batch.input_ids, batch.completion_mask)
