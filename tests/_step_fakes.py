"""A fake runner and a fake reference for :class:`megakto.step.KTOStep`: one process, no DeepSpeed.

Each model is a table of per-token weights: log π(y|x) = Σ_t w[y_t] over the completion's tokens,
read from the model input that the run's :class:`~megakto.data.batcher.Batcher` builds (so the
rows really go through packing). The policy's table is a parameter; :meth:`FakeRunner.train`
back-propagates each micro-batch's scaled loss divided by the gradient accumulation, as DeepSpeed's
engine does, and takes one SGD step at the end. Both record the pairs they were asked to score or
train on, micro-batch by micro-batch. A policy given a ``router`` table is a one-layer mixture of
experts: token t's router logits are ``router[t]``, and each training forward hands the loss its
balancing loss (megakto/model/router.py), as the ZeRO runner does when kto.router_aux_coef > 0."""

from __future__ import annotations

import torch

from megakto.data.batcher import Batcher
from megakto.data.packing import PackedBatch
from megakto.distributed import comm
from megakto.model.router import micro_batch_balance
from megakto.runners.base import EngineOutcome, TrainOutcome


def table_logps(weights: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) Σ of ``weights`` over each segment's completion tokens, and (S,) how many there are."""
    mask = batch.completion_mask.bool()
    segments = batch.segment_ids[mask]
    logps = torch.zeros(batch.num_segments, dtype=weights.dtype).index_add(0, segments, weights[batch.input_ids[mask]])
    return logps, torch.bincount(segments, minlength=batch.num_segments)


class FakeRunner:
    """The policy: ``weights`` (a 1-D table over the vocabulary), SGD at ``lr``, data-parallel group
    ``dp_group`` for the metric sums."""

    def __init__(self, weights, *, batcher: Batcher, lr: float = 1.0, dp_group=None, router=None, top_k: int = 1):
        self.weights = torch.nn.Parameter(torch.as_tensor(weights, dtype=torch.float32).clone())
        # (V, E) router logits per token, or None: a dense policy
        self.router = None if router is None else torch.nn.Parameter(torch.as_tensor(router, dtype=torch.float32))
        self.top_k = top_k
        self.router_grad: torch.Tensor | None = None  # the router's gradient at the last optimizer step
        self.losses: list[float] = []  # every back-propagated micro-batch loss, before scaling
        self.engine = None  # no DeepSpeed engine
        self.batcher, self.lr, self.dp_group = batcher, lr, dp_group
        self.scored: list[list] = []  # the batches of every score() call
        self.trained: list[list] = []  # the batches of every train() call
        self.grad: torch.Tensor | None = None  # the gradient of the last optimizer step

    @torch.no_grad()
    def score(self, batches):
        self.scored.append([list(b) for b in batches])
        return [table_logps(self.weights, self.batcher(pairs))[0] for pairs in batches]

    def train(self, batches, loss_fn, *, scale: float, skipped: str | None) -> TrainOutcome:
        self.trained.append([list(b) for b in batches])
        out = TrainOutcome(skipped=skipped)
        if skipped is not None:
            out.engine = EngineOutcome(self.lr)
            return out
        self.weights.grad = None
        for i, pairs in enumerate(batches):
            batch = self.batcher(pairs)
            logps, n_tokens = table_logps(self.weights, batch)
            if self.router is None:
                micro = loss_fn(i, logps)
            else:
                logits = [self.router[batch.input_ids.reshape(-1)]]  # one MoE layer, tokens flattened
                micro = loss_fn(i, logps, micro_batch_balance(logits, batch, self.top_k))
            self.losses.append(float(micro.loss.detach()))
            (micro.loss * scale / len(batches)).backward()  # DeepSpeed divides by the accumulation steps
            out.backwards += 1
            out.sums.add_micro(micro, logps=logps, n_tokens=n_tokens, tokens=batch.num_tokens)
        self.grad = self.weights.grad.detach().clone()
        with torch.no_grad():
            self.weights -= self.lr * self.grad
            if self.router is not None:
                self.router_grad = self.router.grad.detach().clone()
                self.router -= self.lr * self.router_grad
                self.router.grad = None
        out.engine = EngineOutcome(self.lr, float(self.grad.norm()), False)
        return out

    def reduce_sums(self, values):
        return comm.all_reduce_dict(values, group=self.dp_group)


class FakeReference:
    """The frozen reference: a fixed table of per-token weights."""

    def __init__(self, weights, *, batcher: Batcher):
        self.weights = torch.as_tensor(weights, dtype=torch.float32).clone()
        self.batcher = batcher
        self.scored: list[list] = []

    def logps(self, pairs):
        return self.score([pairs])[0]

    def score(self, batches):
        self.scored.append([list(b) for b in batches])
        return [table_logps(self.weights, self.batcher(pairs))[0] for pairs in batches]
