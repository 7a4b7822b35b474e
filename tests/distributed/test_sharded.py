"""score_sharded: ranks by slicing. Every rank of a data-parallel group scores its share; combined,
the shares are the whole list, each row once, and every rank made the same number of calls."""

import pytest
import torch

from megakto.distributed.sharded import num_calls, score_sharded


class _Scorer:
    def __init__(self):
        self.calls = []

    def __call__(self, rows):
        self.calls.append(list(rows))
        return torch.tensor([float(r) for r in rows], dtype=torch.float32)


def _run(items, dp_size, batch_size, **kwargs):
    scorers, results = [], []
    for r in range(dp_size):
        s = _Scorer()
        results.append(list(score_sharded(items, s, dp_rank=r, dp_size=dp_size, batch_size=batch_size, **kwargs)))
        scorers.append(s)
    return scorers, results


@pytest.mark.parametrize("n,dp_size,batch_size", [(7, 3, 1), (7, 3, 2), (12, 3, 2), (5, 1, 2), (2, 4, 3), (0, 2, 2)])
def test_shares_cover_every_row_once_with_equal_calls(n, dp_size, batch_size):
    items = [10 + i for i in range(n)]
    scorers, results = _run(items, dp_size, batch_size)
    calls = num_calls(n, dp_size=dp_size, batch_size=batch_size)
    assert [len(s.calls) for s in scorers] == [calls] * dp_size
    got = torch.zeros(n, dtype=torch.float64)  # what an all-reduce of the per-rank vectors gives
    seen = []
    for r, batches in enumerate(results):
        for positions, values in batches:
            assert values.dtype == torch.float64 and values.device.type == "cpu"
            assert all(p % dp_size == r for p in positions)  # rank r: rows r, r + dp, ...
            got[positions] += values
            seen += positions
    assert sorted(seen) == list(range(n))
    assert got.tolist() == [float(x) for x in items]


def test_filler_call_and_partial_batch():
    """7 rows, 3 ranks, batch 2: shares of 3, 2, 2 rows; 2 calls each. Rank 0's second call holds
    its one remaining row (no padding); ranks 1 and 2 make a second call on the filler row 10 (row
    0) and yield nothing for it."""
    items = list(range(10, 17))
    scorers, results = _run(items, 3, 2)
    assert scorers[0].calls == [[10, 13], [16]]
    assert scorers[1].calls == [[11, 14], [10]]
    assert scorers[2].calls == [[12, 15], [10]]
    assert [[p for p, _ in batches] for batches in results] == [[[0, 3], [6]], [[1, 4]], [[2, 5]]]


def test_sort_key_orders_each_share_stably():
    """Rank 0 of 2 holds items 0, 2, 4, 6 ("bb", "ccc", "e", "gg"); longest first, and "bb" before
    "gg" (equal length: item order kept)."""
    items = ["bb", "a", "ccc", "dd", "e", "ffff", "gg"]
    rows_seen = []

    def score(rows):
        rows_seen.append(rows)
        return torch.zeros(len(rows))

    out = list(score_sharded(items, score, dp_rank=0, dp_size=2, batch_size=2, sort_key=lambda x: -len(x)))
    assert [p for p, _ in out] == [[2, 0], [6, 4]]
    assert rows_seen == [["ccc", "bb"], ["gg", "e"]]


def test_bad_arguments_and_bad_scores():
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        list(score_sharded([1], _Scorer(), dp_rank=2, dp_size=2, batch_size=1))
    with pytest.raises(ValueError, match="3 values for 2 rows"):
        list(score_sharded([1, 2], lambda rows: torch.zeros(3), dp_rank=0, dp_size=1, batch_size=2))
