"""Completion log-probs of a packed micro-batch under Ulysses sequence parallelism.

Every rank of a sequence-parallel group gets the same :class:`~megakto.data.packing.PackedBatch`,
cuts out its own shard (:mod:`megakto.data.sp_shards`: one row, labels shifted before the cut,
right-padded to a multiple of the group size) and runs the model on it; the attention layers see
the whole sequence through DeepSpeed's all-to-all. The output head is swapped for the chunked
log-probs as in :func:`megakto.model.forward.packed_completion_logps`, on the positions this shard
scores, so each rank holds a partial sum per segment. ``combine`` adds the partial sums over the
group and is differentiable: the KTO loss is then computed alike on every rank of the group, and
each rank back-propagates through its own shard (:mod:`megakto.distributed.sequence` builds it,
with the gradient scale DeepSpeed's averaging needs). Model code never sees a process group.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from megakto.data.packing import PackedBatch
from megakto.data.sp_shards import SequenceShard, sequence_shard
from megakto.model.forward import VocabReducers, segment_head
from megakto.model.lm_head import check_head_output, replaced_output_head

__all__ = ["shard_completion_logps", "sequence_parallel_logps", "sp_logps_function"]

Combine = Callable[[torch.Tensor], torch.Tensor]


def shard_completion_logps(model, shard: SequenceShard, *, chunk_tokens: int | None = None,
                           reducers: VocabReducers = (None, None)) -> torch.Tensor:
    """(S,) this shard's part of each segment's summed completion log-probs (fp32): the log-probs of
    the targets this shard scores, 0 for segments it holds no target of. ``position_ids`` are always
    passed: without them transformers numbers the shard's tokens from 0 (silently wrong here)."""
    mask = shard.scored
    n = shard.num_segments
    head, head_fn = segment_head(model, mask, shard.targets[mask], shard.target_segments[mask], n,
                                 chunk_tokens=chunk_tokens, reducers=reducers, shifted=False)
    with replaced_output_head(head, head_fn) as state:
        out = model(input_ids=shard.input_ids, position_ids=shard.position_ids, attention_mask=None,
                    use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return check_head_output(model, logits, state, n)


def sequence_parallel_logps(model, batch: PackedBatch, *, sp_size: int, sp_rank: int, combine: Combine,
                            chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) summed completion log-probs of ``batch``'s segments, the same on every rank of the group,
    and (S,) their token counts: this rank's shard scored, the partial sums combined."""
    shard = sequence_shard(batch, sp_size, sp_rank).to(batch.input_ids.device)
    return combine(shard_completion_logps(model, shard, chunk_tokens=chunk_tokens)), shard.n_tokens


def sp_logps_function(*, sp_size: int, sp_rank: int, combine: Combine, chunk_tokens: int | None = None):
    """``f(model, batch) -> (logps, n_tokens)``, the trainer's log-prob signature, for rank ``sp_rank``
    of a sequence-parallel group of ``sp_size``."""
    return partial(sequence_parallel_logps, sp_size=sp_size, sp_rank=sp_rank, combine=combine,
                   chunk_tokens=chunk_tokens)
