"""Memory per rank does not grow with the dataset's token ids (ref.mode=cache, 2 gloo ranks).

tools/bench_data.py's "cache fill" run at 3,000 and at 30,000 rows of 40-120 tokens: keys of
every train and eval sequence (targets and KL rows), rank 0's missing list, each rank reading its
share of the missing rows batch by batch and writing its shard, then one training step from the
cache. Only the reference forwards are replaced by the bench's placeholder (their memory does not
depend on the dataset's size; tests/e2e/test_modes.py runs real ones).

Measured: anonymous memory (RssAnon, the process's own memory: the memory-mapped Arrow tables'
file pages are not the rank's to hold) grew 25 MiB per rank from 3,000 to 30,000 rows here; on the
commit before the change, which held every row's token ids as Python lists on every rank, the same
runs grew 131 MiB (and 209 MiB from 5,000 to 50,000 rows, against 26 MiB now). The bound sits
between the two.
"""

import os
import sys

import pytest

from tests.launcher import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))

import bench_data  # noqa: E402

pytestmark = pytest.mark.e2e

GROWTH_BOUND_MIB = 55


def test_cache_mode_memory_does_not_grow_with_token_ids(tmp_path):
    bench_data.write_model(tmp_path / "model", vocab_size=bench_data.VOCAB, seed=0, longest=120, hidden_size=32,
                           num_layers=1, num_heads=2, intermediate_size=64)
    peaks = {}
    for n in (3_000, 30_000):
        files = {}
        for split, m, seed in (("train", n, 0), ("eval", 500, 1)):
            files[split] = str(tmp_path / f"{n}-{split}.jsonl")
            bench_data.write_rows(tmp_path / f"{n}-{split}.jsonl", m, prompt_tokens=(20, 60),
                                  completion_tokens=(20, 60), seed=seed)
        result = bench_data.run_one("cache fill", {"tag": str(n), **files}, tmp_path, 2, timeout=600)
        assert result["ok"], result
        assert result["train_rows"] == n  # nothing filtered
        log = open(result["log"]).read()
        # Every target and KL row of train and eval was computed (placeholders) and found.
        assert f"computed {2 * (n + 500)} log-probs" in log and f"{2 * (n + 500)} log-probs from" in log
        peaks[n] = max(result["peak_anon_mib"])
    growth = peaks[30_000] - peaks[3_000]
    assert growth < GROWTH_BOUND_MIB, f"peak anonymous memory per rank grew {growth:.0f} MiB from 3k to 30k rows: {peaks}"
