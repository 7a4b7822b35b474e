"""The scorers: where reference log-probs come from.

Each answers ``logps(pairs) -> (S,)`` for a list of (prompt_ids, completion_ids) sequences, so the
trainer does not know which one it has (:class:`Reference`).

* :class:`OnlineReference` packs the sequences and runs a frozen engine (the ZeRO-3 inference
  engine; another runner's reference, e.g. a pipeline engine or the policy with its adapters off,
  is one more engine behind the same ``batcher``/``logps_fn`` pair, or one more class here: the
  pipeline's is :class:`megakto.runners.pipeline.PipelineReference`).
* :class:`CachedReference` looks each sequence up by content in a
  :class:`~megakto.reference.store.RefLogpCache` built once before training; a missing sequence is
  an error, never a silent fallback.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from megakto.data.batcher import Batcher
from megakto.reference.store import RefLogpCache, sequence_key

__all__ = ["Reference", "OnlineReference", "AdapterOffReference", "CachedReference"]

Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]


class Reference(Protocol):
    def logps(self, pairs: Pairs) -> torch.Tensor:
        """Reference log pi_ref(y|x) of each (prompt_ids, completion_ids), shape (len(pairs),)."""
        ...

    def score(self, batches: Sequence[Pairs]) -> list[torch.Tensor]:
        """:meth:`logps` of each batch (a pipeline reference runs them through its stages together)."""
        ...


class OnlineReference:
    def __init__(self, engine, batcher: Batcher, logps_fn: Callable):
        self.engine = engine
        self._batch = batcher  # pairs -> PackedBatch on the device
        self._logps = logps_fn  # (model, PackedBatch) -> (logps, n_tokens)

    @torch.no_grad()
    def logps(self, pairs: Pairs) -> torch.Tensor:
        return self._logps(self.engine, self._batch(pairs))[0]

    def score(self, batches: Sequence[Pairs]) -> list[torch.Tensor]:
        return [self.logps(pairs) for pairs in batches]

    def release(self) -> None:
        """Done with this scorer (the cache precompute's): let its engine be freed with it."""
        from megakto.distributed import engine

        engine.release_engine(self.engine)


class AdapterOffReference:
    """LoRA: π_ref is the policy's base weights, so the reference is the policy engine run with its
    adapters off (peft's ``disable_adapter``); no second model exists. ``policy`` is the engine."""

    def __init__(self, policy, batcher: Batcher, logps_fn: Callable):
        self.policy = policy
        self._batch = batcher
        self._logps = logps_fn

    @torch.no_grad()
    def logps(self, pairs: Pairs) -> torch.Tensor:
        with self.policy.module.disable_adapter():
            return self._logps(self.policy, self._batch(pairs))[0]

    def score(self, batches: Sequence[Pairs]) -> list[torch.Tensor]:
        return [self.logps(pairs) for pairs in batches]


class CachedReference:
    def __init__(self, cache: RefLogpCache, device, *, precompute_seconds: float = 0.0):
        self.cache = cache
        self.device = device
        self.precompute_seconds = precompute_seconds  # filling the missing entries at setup; 0 = none were

    def logps(self, pairs: Pairs) -> torch.Tensor:
        return self.cache.lookup([sequence_key(p, c) for p, c in pairs]).to(self.device, torch.float32)

    def score(self, batches: Sequence[Pairs]) -> list[torch.Tensor]:
        return [self.logps(pairs) for pairs in batches]
