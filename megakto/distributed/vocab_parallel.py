"""Process-group side of vocabulary-parallel log-probs.

:func:`megakto.kto.chunked_logps.token_logps` takes the reductions it needs as two callables so
that the math stays free of ``torch.distributed``; this module builds them for a tensor-parallel
group, plus the row range each rank owns. The scheme is Megatron's ``vocab_parallel_cross_entropy``.

Why megakto's own and not DeepSpeed's. deepspeed 0.19.8 ships the same ops in ``deepspeed/sequence/``
(``vocab_parallel_logprobs`` over a head's whole (N, V/tp) logits; ``vocab_parallel_linear_cross_entropy``,
projection and loss fused and chunked), written after these. ``tools/bench_vocab_parallel.py`` runs
all three on the same bf16-exact inputs against an fp64 reference, TP1 and TP2 over gloo (2-core CPU;
H 256/1024, V 32000/152064, N 2048-8192; the tables are in docs/parallel.md):

* numerics: in fp32 all three are at fp32 rounding (log-probs within 5e-6 nats). In bf16
  DeepSpeed's logits come out of a bf16 GEMM, rounded to 8 significant bits (its fp32-output GEMM,
  ``mm(..., out_dtype=float32)``, exists on CUDA only): log-probs off by up to 0.067 nats, 0.010 on
  average, and gradients 2-7x further from the reference than megakto's, whose fp32 logits keep
  the log-probs within 5e-6 in bf16 too. KTO sums hundreds of token log-probs into each reward, so
  that error is noise of the size of early reward margins.
* memory (peak allocated during forward + backward): the whole-logits op needs 1.1-21x megakto's
  (the logits and their gradient); the fused op 0.16-0.93x: its blocks are the size of the hidden
  states and a bf16 weight stays bf16, where megakto holds a 64 MiB logits block and, for a bf16
  weight, an fp32 copy of the rank's rows and an fp32 gradient sum, the price of its fp32 logits
  (1257 vs 329 MiB at H=1024, V=152064, TP1).
* time of forward + backward, against megakto's: the fused op 0.57-1.31x in bf16 (bf16 GEMMs
  against megakto's fp32 ones) and 0.96-1.95x in fp32; the whole-logits op 0.39-1.17x.
* collectives: megakto 2 all-reduces per call and 1 in backward; the fused op 2 per chunk of
  tokens (150 per call at V=152064, H=1024, TP2), an all-gather of the shard bounds and host syncs
  on every call. Neither DeepSpeed op takes megakto's vocabulary blocks (:mod:`megakto.model.vocab_blocks`
  reuses :func:`~megakto.kto.chunked_logps.shard_stats`).

DeepSpeed's fused op wins memory and, in bf16, mostly speed; megakto's wins numerics, which is
what its fp32 logits are for, so megakto's stays. On a GPU the fused op takes the fp32-output GEMM,
so there its numerics should match megakto's with bf16 tensor cores: measure it on a GPU before
choosing again. ``tests/distributed/test_vocab_parallel_deepspeed.py`` pins the comparison on gloo
(agreement in fp32, DeepSpeed's bf16 rounding on CPU), so a DeepSpeed release that changes either
fails it.
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
