"""DeepSpeed's own vocabulary-parallel log-probs (deepspeed >= 0.19.8, ``deepspeed/sequence/``),
behind the signature and group convention of :func:`megakto.kto.chunked_logps.token_logps`, so the
two can be compared on the same inputs. Training does not use them: the measurements that keep
megakto's own are in :mod:`megakto.distributed.vocab_parallel`; ``tools/bench_vocab_parallel.py``
reproduces them and ``tests/distributed/test_vocab_parallel_deepspeed.py`` pins their numerics.

Two ways, ``op``:

* ``"fused"``: ``vocab_parallel_linear_cross_entropy(reduction="none")``, the head's projection
  fused into the loss, chunked over tokens in the forward and over vocabulary rows in the
  backward; its per-token cross-entropy is minus the log-prob;
* ``"logits"``: the head as AutoTP's ``VocabParallelLinear`` computes it, ``hidden @ weight.T``
  into a whole (N, V_local) logits tensor in the weight's dtype, then ``vocab_parallel_logprobs``.

Convention as in ``token_logps``: every rank of ``group`` passes the same ``hidden`` and ``targets``
and back-propagates the same upstream gradient; the result is the full-vocabulary log-prob (fp32)
on every rank, ``weight``'s gradient is the rank's own rows and ``hidden``'s the full sum over the
vocabulary (the fused op all-reduces it itself; for ``"logits"`` :class:`_SumGradOverGroup` does what
the column-parallel layer before a real head does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.sequence.linear_cross_entropy import vocab_parallel_linear_cross_entropy
from deepspeed.sequence.vocab_parallel_ops import vocab_parallel_logprobs

from megakto.distributed.comm import ProcessGroup, all_reduce_sum, group_size

__all__ = ["deepspeed_token_logps", "DEEPSPEED_OPS"]

DEEPSPEED_OPS = ("fused", "logits")


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ``group`` (Megatron's copy-to-tensor-
    parallel-region)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.contiguous().clone(), group=ctx.group), None


def deepspeed_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, op: str,
                          vocab_start: int, group: ProcessGroup) -> torch.Tensor:
    """(N,) log softmax(hidden @ W.T)[targets] by DeepSpeed's ``op`` (``fused`` or ``logits``);
    ``weight`` holds the rows ``[vocab_start, vocab_start + V_local)`` of ``group``'s head. The
    DeepSpeed communication backend must be up (:func:`megakto.distributed.engine.init_distributed`)."""
    if op not in DEEPSPEED_OPS:
        raise ValueError(f"unknown DeepSpeed op {op!r}; expected one of {', '.join(DEEPSPEED_OPS)}")
    tp_group = group if group_size(group=group) > 1 else None  # DeepSpeed's "no vocabulary parallelism"
    bounds = dict(vocab_start_index=int(vocab_start), vocab_end_index=int(vocab_start) + weight.shape[0])
    if op == "fused":
        return -vocab_parallel_linear_cross_entropy(hidden, weight, targets, tp_group=tp_group, reduction="none",
                                                    **bounds)
    if tp_group is not None:
        hidden = _SumGradOverGroup.apply(hidden, tp_group)
    return vocab_parallel_logprobs(F.linear(hidden, weight), targets, tp_group=tp_group, **bounds)
