"""Fill a :class:`~megakto.reference.store.RefLogpCache` with the log-probs it lacks, sharded over
the data-parallel ranks.

This module never talks to ``torch.distributed``: :func:`precompute` is told its data-parallel
rank and size, and the caller places the barrier and :meth:`RefLogpCache.reload` after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from megakto.distributed.sharded import score_sharded
from megakto.reference.store import RefLogpCache

__all__ = ["precompute"]


def precompute(cache: RefLogpCache, keys_and_rows: Iterable[tuple[bytes, Sequence[int], Sequence[int]]],
               logps_fn: Callable[[list[tuple[Sequence[int], Sequence[int]]]], torch.Tensor], *,
               rank: int, world_size: int, batch_size: int, writer: str | None = None,
               flush_every: int | None = None, todo: Sequence[bytes] | None = None, write: bool = True) -> int:
    """Compute this rank's share of the keys missing from ``cache``; returns how many it computed.

    ``rank`` and ``world_size`` are the data-parallel rank and size. ``keys_and_rows`` is every
    (key, prompt_ids, completion_ids) the run needs, on every rank in any order (duplicates are
    dropped by key). The missing keys are sorted and rank r takes every ``world_size``-th from
    position r (:func:`~megakto.distributed.sharded.score_sharded`), so the ranks split the work
    without talking, provided all of them see the same cache state. ``logps_fn(rows) ->
    (len(rows),)`` scores one batch. Results go to one shard per rank (``writer`` defaults to
    ``rank<r>``), or one every ``flush_every`` rows so that a crash keeps finished work. ``todo``:
    the sorted keys to compute, decided once for all ranks (default: the ones this rank finds
    missing). ``write=False``: compute (the forwards are collective) but store nothing, for the
    tensor-parallel peers of the rank that writes. The caller then runs a barrier and
    :meth:`~RefLogpCache.reload`.
    """
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"rank={rank}, world_size={world_size}, batch_size={batch_size}")
    rows: dict[bytes, tuple] = {}
    for key, p, c in keys_and_rows:
        rows.setdefault(bytes(key), (p, c))
    wanted = list(rows)
    todo = sorted(wanted[i] for i in cache.missing(wanted)) if todo is None else list(todo)
    if not todo:
        return 0

    def longest_first(k: bytes):
        # A batch holds rows of similar length (little padding), and running out of memory shows
        # on the first batch rather than after hours.
        return -(len(rows[k][0]) + len(rows[k][1])), k

    writer = writer or f"rank{rank}"
    done_keys: list[bytes] = []
    done_logps: list[torch.Tensor] = []
    computed = 0
    for positions, out in score_sharded(todo, lambda keys: logps_fn([rows[k] for k in keys]), dp_rank=rank,
                                        dp_size=world_size, batch_size=batch_size, sort_key=longest_first):
        done_keys += [todo[i] for i in positions]
        done_logps.append(out)
        computed += len(positions)
        if not write:
            done_keys, done_logps = [], []
        elif flush_every and len(done_keys) >= flush_every:
            cache.write_shard(done_keys, torch.cat(done_logps), writer)
            done_keys, done_logps = [], []
    if done_keys:
        cache.write_shard(done_keys, torch.cat(done_logps), writer)
    return computed
