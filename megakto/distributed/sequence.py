"""Process-group side of sequence-parallel log-probs: the sum of each rank's partial per-segment
log-prob sums over the sequence-parallel group, differentiable, with the gradient scale that makes
DeepSpeed's averaging come out as one process's gradient.

Why a scale. Each rank of a sequence group back-propagates through its own shard, and DeepSpeed
sums the shards' weight gradients over every rank of ZeRO's partition group, then divides. The
forward here is a sum (every rank gets the whole-sequence log-probs, so the KTO loss is the same
on all of them); its backward all-reduces the upstream gradient, the exact gradient of a sum
whatever each rank's upstream is, which with equal upstreams hands every shard ``sp`` times
d loss / d logps. How DeepSpeed divides decides what that must be multiplied by (read in
DeepSpeed 0.19.8, pinned against one process by tests/distributed/test_sequence_parallel.py):

* ZeRO-3 with ``reduce_scatter`` (its default): ``reduce_scatter_coalesced`` divides by the whole
  partition group, dp × sp ranks, so the ``sp`` copies cancel: scale 1;
* ZeRO-3 with ``reduce_scatter: false``, and ZeRO-0/1/2: they divide by dp × sp / sp ranks (the
  data-parallel ranks), so the gradient must be 1/sp of the all-reduced one.

megakto's sequence parallelism runs under ZeRO-3 (:mod:`megakto.distributed.ds_config`); both of
its settings are covered here.
"""

from __future__ import annotations

from typing import Callable

import torch

from megakto.distributed.comm import ProcessGroup, all_reduce_sum, group_size

__all__ = ["grad_scale", "sequence_sum"]


def grad_scale(ds_config: dict, sp: int) -> float:
    """The factor on the all-reduced gradient of :func:`sequence_sum` for a policy engine with
    ``ds_config`` and ``sp`` sequence ranks (see the module docstring)."""
    zero = ds_config.get("zero_optimization") or {}
    divides_by_all = zero.get("stage") == 3 and zero.get("reduce_scatter", True)
    return 1.0 if divides_by_all else 1.0 / sp


class _SumOverGroup(torch.autograd.Function):
    """Forward: the sum over ``group``. Backward: the sum over ``group`` of the upstream gradients,
    times ``scale``."""

    @staticmethod
    def forward(ctx, t, group, scale):
        ctx.group, ctx.scale = group, scale
        return all_reduce_sum(t.clone(), group=group)

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce_sum(grad.contiguous().clone(), group=ctx.group)
        return grad * ctx.scale if ctx.scale != 1.0 else grad, None, None


def sequence_sum(*, group: ProcessGroup, scale: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """``combine(partial) -> total``: the differentiable sum of ``partial`` over ``group`` (the
    sequence-parallel group), its gradient scaled by ``scale`` (:func:`grad_scale`). The identity
    for a group of one."""
    if group is None or group_size(group=group) == 1:
        return lambda t: t

    def combine(partial: torch.Tensor) -> torch.Tensor:
        return _SumOverGroup.apply(partial, group, scale)

    return combine
