"""Score a list of rows split over the data-parallel ranks, every rank making the same number of
forward calls.

Under ZeRO-3 each forward gathers the parameters collectively, so a rank that made one call
fewer would leave the others waiting. Rank r takes rows r, r + dp, r + 2·dp, ... and scores them
in batches; a rank whose share has run out scores one filler row (the first row) and drops the
result. The caller passes the data-parallel coordinates, not the global rank: ranks of one
tensor-parallel group hold the same share.

Pure: no collectives here. The caller combines the ranks' results (an all-reduce of a vector with
each row filled in on exactly one rank, or a shard per rank on disk).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

__all__ = ["num_calls", "score_sharded"]

T = TypeVar("T")


def num_calls(n: int, *, dp_size: int, batch_size: int) -> int:
    """Forward calls each rank makes for ``n`` rows: batches of the largest share."""
    return math.ceil(math.ceil(n / dp_size) / batch_size)


def score_sharded(items: Sequence[T], score: Callable[[list[T]], torch.Tensor], *, dp_rank: int, dp_size: int,
                  batch_size: int, sort_key: Callable[[T], Any] | None = None
                  ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(positions into items, float64 CPU scores)`` for each call on this rank's rows.

    ``items`` must be the same list on every rank. ``score(rows) -> (len(rows),)`` is one forward.
    ``sort_key`` orders this rank's share (stable: ties keep item order) before it is cut into
    batches of ``batch_size``. Calls on filler rows yield nothing, so a rank yields fewer batches
    than it makes calls; iterate to the end, or the other ranks wait for the calls not made.
    """
    if not 0 <= dp_rank < dp_size or batch_size < 1:
        raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}, batch_size={batch_size}")
    n = len(items)
    mine = list(range(dp_rank, n, dp_size))
    if sort_key is not None:
        mine.sort(key=lambda i: sort_key(items[i]))
    for b in range(num_calls(n, dp_size=dp_size, batch_size=batch_size)):
        positions = mine[b * batch_size:(b + 1) * batch_size]
        rows = [items[i] for i in positions] or [items[0]]
        out = torch.as_tensor(score(rows)).detach().to("cpu", torch.float64).reshape(-1)
        if out.numel() != len(rows):
            raise ValueError(f"score returned {out.numel()} values for {len(rows)} rows")
        if positions:
            yield positions, out
