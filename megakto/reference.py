"""Where reference log-probs come from: a frozen engine run online, or a precomputed cache.

Both answer ``logps(pairs) -> (S,)`` for a list of (prompt_ids, completion_ids) sequences, so the
trainer does not know which one it has.

* :class:`OnlineReference` packs the sequences and runs the ZeRO-3 inference engine.
* :class:`CachedReference` looks each sequence up by content in a
  :class:`~megakto.ref_cache.RefLogpCache` built once before training; a missing sequence is an
  error, never a silent fallback. In cache mode the KL rows must be a fixed set, so each row's
  mismatched partner is drawn once for the whole dataset (:func:`dataset_kl_partners`) instead of
  per global batch; the cache then survives reshuffles, seeds and reruns.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megakto.data import fit_to_length, kl_partners
from megakto.ref_cache import RefLogpCache, sequence_key

__all__ = ["OnlineReference", "CachedReference", "dataset_kl_partners", "fit_kl_row"]

Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]

# Fixed, so that runs with different seeds share one cache of KL-row log-probs.
DATASET_KL_SEED, DATASET_KL_STEP = 0, 0


def dataset_kl_partners(prompt_keys: Sequence[int]) -> list[int]:
    """One mismatched partner per row of a whole split, the same in every run."""
    return kl_partners(prompt_keys, seed=DATASET_KL_SEED, step=DATASET_KL_STEP)


def fit_kl_row(prompt_ids, completion_ids, max_length: int, max_prompt_length: int):
    """Prompt i with completion j, cut to ``max_length`` the same way target rows are."""
    fitted = fit_to_length(prompt_ids, completion_ids, max_length, max_prompt_length)
    assert fitted is not None, "max_prompt_length < max_length always leaves room for a completion token"
    return fitted


class OnlineReference:
    def __init__(self, engine, batch_fn: Callable, logps_fn: Callable):
        self.engine = engine
        self._batch = batch_fn  # pairs -> PackedBatch on the device
        self._logps = logps_fn  # (model, PackedBatch) -> (logps, n_tokens)

    @torch.no_grad()
    def logps(self, pairs: Pairs) -> torch.Tensor:
        return self._logps(self.engine, self._batch(pairs))[0]


class CachedReference:
    def __init__(self, cache: RefLogpCache, device):
        self.cache = cache
        self.device = device

    def logps(self, pairs: Pairs) -> torch.Tensor:
        return self.cache.lookup([sequence_key(p, c) for p, c in pairs]).to(self.device, torch.float32)
