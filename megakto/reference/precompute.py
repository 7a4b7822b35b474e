"""Fill a :class:`~megakto.reference.store.RefLogpCache` with the log-probs it lacks, sharded over
the data-parallel ranks.

The run's sequences come as a :class:`~megakto.reference.sequences.Sequences`: keys and lengths in
numpy arrays, token ids read on demand. So a rank holds ~20 bytes per sequence of the whole run,
and reads the token ids of its own share of the missing ones only, one batch at a time.

This module never talks to ``torch.distributed``: :func:`precompute` is told its data-parallel
rank and size (and, from the caller, the positions rank 0 found missing), and the caller places
the barrier and :meth:`RefLogpCache.reload` after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from megakto.distributed.sharded import score_sharded
from megakto.reference.sequences import Sequences
from megakto.reference.store import RefLogpCache

__all__ = ["missing_positions", "precompute"]


def missing_positions(cache: RefLogpCache, sequences: Sequences) -> np.ndarray:
    """Positions into ``sequences`` of the keys ``cache`` lacks: one per distinct key (its first
    position), in key order (int64)."""
    absent = cache.missing(sequences.keys)
    _, first = np.unique(sequences.keys[absent], return_index=True)  # sorted by key
    return absent[first]


def precompute(cache: RefLogpCache, sequences: Sequences,
               logps_fn: Callable[[list[tuple[Sequence[int], Sequence[int]]]], torch.Tensor], *,
               rank: int, world_size: int, batch_size: int, writer: str | None = None,
               flush_every: int | None = None, todo: np.ndarray | None = None, write: bool = True) -> int:
    """Compute this rank's share of the sequences missing from ``cache``; returns how many it computed.

    ``rank`` and ``world_size`` are the data-parallel rank and size. ``todo``: positions into
    ``sequences`` to compute, in key order with one per distinct key, decided once for all ranks
    (default: :func:`missing_positions` as this rank sees the cache). Rank r takes every
    ``world_size``-th from position r (:func:`~megakto.distributed.sharded.score_sharded`), so the
    ranks split the work without talking, longest sequence first within a share (a batch holds
    rows of similar length, and running out of memory shows on the first batch rather than after
    hours). ``logps_fn(rows) -> (len(rows),)`` scores one batch of (prompt_ids, completion_ids).
    Results go to one shard per rank (``writer`` defaults to ``rank<r>``), or one every
    ``flush_every`` rows so that a crash keeps finished work. ``write=False``: compute (the
    forwards are collective) but store nothing, for the tensor-parallel peers of the rank that
    writes. The caller then runs a barrier and :meth:`~RefLogpCache.reload`.
    """
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"rank={rank}, world_size={world_size}, batch_size={batch_size}")
    todo = missing_positions(cache, sequences) if todo is None else np.asarray(todo, dtype=np.int64)
    if not len(todo):
        return 0
    keys, lengths = sequences.keys, sequences.lengths

    def longest_first(position):
        return -int(lengths[position]), keys[position]

    writer = writer or f"rank{rank}"
    done: list[np.ndarray] = []
    done_logps: list[torch.Tensor] = []
    computed = pending = 0
    for positions, out in score_sharded(todo, lambda ps: logps_fn(sequences.fetch(ps)), dp_rank=rank,
                                        dp_size=world_size, batch_size=batch_size, sort_key=longest_first):
        computed += len(positions)
        if not write:
            continue
        done.append(keys[todo[positions]])
        done_logps.append(out)
        pending += len(positions)
        if flush_every and pending >= flush_every:
            cache.write_shard(np.concatenate(done), torch.cat(done_logps), writer)
            done, done_logps, pending = [], [], 0
    if pending:
        cache.write_shard(np.concatenate(done), torch.cat(done_logps), writer)
    return computed
