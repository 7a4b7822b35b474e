"""Token log-probs from hidden states without materialising (tokens x vocabulary) logits.

:func:`megakto.kto.sequence_logps` is the reference: it takes full (B, T, V) logits, and autograd
keeps an fp32 (B, T-1, V) log-softmax alive until backward. For a 128k-256k vocabulary that block
dominates activation memory. Here the output projection and the log-softmax are fused:

* tokens are processed ``chunk_size`` at a time; the forward holds one (chunk, V_local) block and
  keeps only the per-token log-normaliser (N,) for backward;
* backward recomputes each block and applies d log p(y) / d z = onehot(y) - softmax(z), the
  gradient that the log-prob of eq. (7)'s log pi(y|x) needs (Ethayarajh et al. 2024);
* the caller passes only the scored positions (:func:`megakto.model.forward.packed_completion_logps`
  selects completion tokens), so prompt and padding tokens never get logits.

Vocabulary parallelism follows Megatron's ``vocab_parallel_cross_entropy``: ``weight`` may be the
rows [vocab_start, vocab_start + V_local) of the output matrix, and two callables supplied by the
caller reduce over the shards (max, then sum). This module never talks to a process group itself;
:mod:`megakto.distributed.vocab_parallel` builds the callables.

Group convention (exact under it): every shard receives the same ``hidden`` and the same upstream
gradient. The forward returns the full-vocabulary log-prob on every shard. The backward returns the
gradient of each shard's *local* weight rows, and the *full* hidden gradient: each shard's partial
sum over its vocabulary rows is combined with ``reduce_sum`` inside backward, so what flows on into
the layers below is identical on every shard (Megatron puts the same all-reduce in the backward of
its copy-to-tensor-parallel-region op).

Precision: the matmuls take their operands in the parameters' dtype, as the ``nn.Linear`` they
replace does, but a half-precision (bf16) weight's products and sums are fp32 and so is the logits
block: the weight is widened to fp32 once per call and each chunk of hidden states with it (exact,
every bf16 number is an fp32 number). Rounding the logits to bf16 first, as ``nn.Linear`` followed
by ``.float()`` does, moves a token's log-prob by up to half an ulp of its logit, 0.03-0.06 nats for
logits of 8-32, and over hundreds of completion tokens that is noise of the size of early rewards.
The log-sum-exp, softmax and log-probs are fp32 (fp64 when the inputs are fp64); the backward
recomputes the same fp32 logits, keeps the softmax gradient in fp32 for both matmuls and sums the
weight gradient over the chunks in an fp32 buffer, cast to the weight's dtype once at the end (a bf16
running sum would be rounded again after every chunk). fp32 and fp64 weights take the very same path
as before, bit for bit. On a GPU these fp32 matmuls forgo bf16 tensor cores, so the head's share of a
step grows there (torch's CUDA-only ``mm(..., out_dtype=torch.float32)`` keeps bf16 operands with an
fp32 output; not used while it cannot be tested on CPU). ``hidden`` may be wider than the weight
(fp32 over a bf16 shard, from :mod:`megakto.model.vocab_blocks`); the hidden gradient comes back in
``hidden``'s dtype, so callers that sum several shards' hidden gradients can do it in fp32.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["token_logps", "shard_stats", "local_targets"]

Reducer = Callable[[torch.Tensor], Optional[torch.Tensor]]


def _reduce(fn: Reducer | None, t: torch.Tensor) -> torch.Tensor:
    """Apply an all-reduce that may work in place (returns None) or return its result."""
    if fn is None:
        return t
    out = fn(t)
    return t if out is None else out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: fp32 for a half-precision weight (its products and sums,
    and the logits they give, are not rounded to 8 significant bits), the weight's own otherwise."""
    return torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype


class _ShardStats(torch.autograd.Function):
    """Per token: the log-sum-exp of ``hidden @ weight.T`` over this shard's rows, and the target's
    logit where the shard owns the target (0 elsewhere). Chunked forward; recomputing backward."""

    @staticmethod
    def forward(ctx, hidden, weight, local_t, chunk_size, reduce_grad_h):
        n, v_local = hidden.shape[0], weight.shape[0]
        acc = _compute_dtype(hidden.dtype)
        w = weight.to(_matmul_dtype(weight))  # a half weight widened once per call; the weight itself otherwise
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        target_logit = torch.zeros(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = (hidden[s:e].to(w.dtype) @ w.T).to(acc)  # the only (chunk, V_local) block
            lt = local_t[s:e]
            picked = logits.gather(1, lt.clamp(min=0).unsqueeze(1)).squeeze(1)
            target_logit[s:e] = torch.where(lt >= 0, picked, 0.0)
            # log-sum-exp in place (torch.logsumexp would allocate a second block).
            m = logits.amax(dim=-1, keepdim=True) if v_local else logits.new_zeros(e - s, 1)
            m = torch.where(torch.isfinite(m), m, 0.0)
            lse[s:e] = torch.log(logits.sub_(m).exp_().sum(dim=-1)) + m.squeeze(1)
            del logits
        del w
        ctx.save_for_backward(hidden, weight, local_t, lse)
        ctx.chunk_size = chunk_size
        ctx.reduce_grad_h = reduce_grad_h
        return lse, target_logit

    @staticmethod
    def backward(ctx, grad_lse, grad_target):
        hidden, weight, local_t, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(_matmul_dtype(weight))
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=w.dtype) if need_w else None  # fp32 sum over chunks for half weights
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
        grad_target = torch.zeros_like(lse) if grad_target is None else grad_target.to(lse.dtype)
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            e = min(s + ctx.chunk_size, hidden.shape[0])
            h = hidden[s:e].to(w.dtype)
            logits = (h @ w.T).to(lse.dtype)  # the forward's logits, bit for bit
            # d lse / d z = softmax over the shard's rows; d target_logit / d z = onehot(y). Built
            # in place in the recomputed block. With lse the full log-normaliser and
            # grad_lse = -grad_target this is (onehot(y) - softmax(z)) * upstream, eq. (7)'s
            # d log pi(y|x) / d z (Ethayarajh et al. 2024).
            g = torch.exp_(logits.sub_(lse[s:e].unsqueeze(1))).mul_(grad_lse[s:e].unsqueeze(1))
            # + onehot(y) * grad_target on the rows whose target this shard owns, as a scatter (rows
            # owned elsewhere add an exact 0 to column 0): no nonzero, so no host sync per chunk and
            # vocabulary block, which would stall the CPU before every block's ZeRO-3 gather.
            lt = local_t[s:e]
            owned = lt >= 0
            g.scatter_add_(1, lt.clamp(min=0).unsqueeze(1),
                           torch.where(owned, grad_target[s:e], 0.0).unsqueeze(1))
            g = g.to(w.dtype)
            if need_h:
                grad_h[s:e] = g @ w  # cast to hidden's dtype on assignment
            if need_w:
                grad_w.addmm_(g.T, h)
            del logits, g, h
        del w
        if need_w:
            grad_w = grad_w.to(weight.dtype)  # rounded once (a no-op unless the weight is half precision)
        if need_h:
            # Each shard holds the part of dL/dh from its own vocabulary rows; sum them.
            grad_h = _reduce(ctx.reduce_grad_h, grad_h)
        return grad_h, grad_w, None, None, None


class _GroupSum(torch.autograd.Function):
    """All-reduce sum over the vocabulary-parallel group; identity backward (every shard receives
    the same upstream gradient, Megatron's reduce-from-tensor-parallel-region)."""

    @staticmethod
    def forward(ctx, t, reduce_sum):
        return _reduce(reduce_sum, t.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def local_targets(targets: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Target ids relative to the rows ``[start, start + rows)``; -1 where another shard owns them."""
    local_t = targets - start
    return torch.where((local_t >= 0) & (local_t < rows), local_t, -1)


def shard_stats(hidden: torch.Tensor, weight: torch.Tensor, local_t: torch.Tensor, chunk_size: int,
                reduce_grad_h: Reducer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, target_logit)``, each (N,): the log-sum-exp of the logits over ``weight``'s rows and
    the target's logit where ``local_t >= 0`` (0 elsewhere), one chunk of tokens at a time, with a
    recomputing backward. Shards combine as log-sum-exp of their ``lse`` and sum of their
    ``target_logit``; ``reduce_grad_h`` sums the hidden gradient over a vocabulary-parallel group."""
    return _ShardStats.apply(hidden, weight, local_t, int(chunk_size), reduce_grad_h)


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    vocab_start: int = 0,
    reduce_max: Reducer | None = None,
    reduce_sum: Reducer | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ W.T)[targets] over the full vocabulary, one chunk of tokens at a time.

    Args:
        hidden: (N, H) hidden states, one row per scored token.
        weight: (V_local, H) output-embedding rows ``[vocab_start, vocab_start + V_local)``; the
            whole matrix when there is no vocabulary-parallel group.
        targets: (N,) long, global vocabulary ids.
        chunk_size: tokens per (chunk, V_local) logits block.
        reduce_max, reduce_sum: all-reduce (max / sum) over the vocabulary-parallel group, in
            place or returning the result; None when the weight is not sharded. See the module
            docstring for the gradient convention.

    Returns:
        (N,) log-probs, fp32 (fp64 for fp64 inputs).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) = {tuple(hidden.shape[:1])}; got {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if (reduce_max is None) != (reduce_sum is None):
        raise ValueError("reduce_max and reduce_sum go together: both for a sharded weight, neither otherwise")
    local_t = local_targets(targets, int(vocab_start), weight.shape[0])
    lse, target_logit = shard_stats(hidden, weight, local_t, chunk_size, reduce_sum)
    if reduce_sum is None:
        return target_logit - lse
    # Combine shards: log sum_k exp(lse_k) = m + log sum_k exp(lse_k - m), m = max_k lse_k.
    # Two collectives per call (not per chunk), each over N numbers.
    m = _reduce(reduce_max, lse.detach().clone())
    m = torch.where(torch.isfinite(m), m, 0.0)  # every shard empty: avoid inf - inf
    both = _GroupSum.apply(torch.stack([torch.exp(lse - m), target_logit]), reduce_sum)
    return both[1] - (m + torch.log(both[0]))
