"""Process-group side of vocabulary-parallel log-probs.

:func:`megakto.kto.chunked_logps.token_logps` takes the reductions it needs as two callables so
that the math stays free of ``torch.distributed``; this module builds them for a tensor-parallel
group, plus the row range each rank owns. The scheme is Megatron's ``vocab_parallel_cross_entropy``.
"""

from __future__ import annotations

from typing import Callable

import torch

from megakto.distributed.comm import ProcessGroup, all_reduce_max, all_reduce_sum, group_rank, group_size

__all__ = ["group_reducers", "vocab_shard_range"]


Reducer = Callable[[torch.Tensor], torch.Tensor]


def group_reducers(group: ProcessGroup) -> tuple[Reducer | None, Reducer | None]:
    """``(reduce_max, reduce_sum)``: in-place all-reduces over ``group`` that also return the tensor.

    ``(None, None)`` when there is nothing to reduce over (no group, or a group of one), which
    ``token_logps`` treats as "the weight is the whole vocabulary".
    """
    if group is None or group_size(group=group) == 1:
        return None, None

    def reduce_max(t: torch.Tensor) -> torch.Tensor:
        return all_reduce_max(t, group=group)

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, group=group)

    return reduce_max, reduce_sum


def vocab_shard_range(vocab_size: int, group: ProcessGroup) -> tuple[int, int]:
    """``(start, end)`` rows of a ``vocab_size``-row output matrix owned by this rank of ``group``.

    Rows are split as evenly as possible; the first ``vocab_size % size`` ranks get one extra row.
    """
    size, r = (group_size(group=group), group_rank(group=group)) if group is not None else (1, 0)
    base, extra = divmod(vocab_size, size)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)
