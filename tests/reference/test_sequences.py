"""The run's reference sequences as keys and lengths: the same keys, lengths and token ids as the
Python lists they replace, across chunk boundaries, a filtered Arrow table and concatenated splits."""

import numpy as np
import pytest
from datasets import Dataset

from megakto.data.kl_pairs import dataset_kl_partners, fit_kl_row
from megakto.data.split import TokenizedSplit
from megakto.reference.sequences import ConcatSequences, PairSequences, SplitSequences
from megakto.reference.store import sequence_key

MAX_LENGTH, MAX_PROMPT = 9, 4


def _split(n=23, offset=0, drop_odd=False):
    """Rows of varied lengths (some KL rows must be cut to MAX_LENGTH); with ``drop_odd`` the
    table is filtered, so datasets reads it through an indices mapping."""
    prompts = [[1] + [offset + i] * (1 + i % 5) for i in range(n)]
    completions = [[100 + offset + i] * (1 + (3 * i) % 7) for i in range(n)]
    ds = Dataset.from_dict({"prompt_ids": prompts, "completion_ids": completions,
                            "label": [i % 2 == 0 for i in range(n)], "prompt_key": [offset + i // 2 for i in range(n)]})
    if drop_odd:
        ds = ds.filter(lambda row: row % 2 == 0, input_columns="prompt_key")
        keep = [i for i in range(n) if (offset + i // 2) % 2 == 0]
        prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
    return TokenizedSplit(ds), prompts, completions


def _expected(prompts, completions, partners):
    targets = list(zip(prompts, completions))
    kl = [fit_kl_row(p, completions[j], MAX_LENGTH, MAX_PROMPT) for p, j in zip(prompts, partners)]
    return targets + [(list(p), list(c)) for p, c in kl]


@pytest.mark.parametrize("drop_odd", [False, True])
def test_keys_lengths_and_rows_match_the_lists(drop_odd):
    split, prompts, completions = _split(drop_odd=drop_odd)
    partners = dataset_kl_partners(split.prompt_key)
    want = _expected(prompts, completions, partners)
    assert any(len(p) + len(c) > MAX_LENGTH for p, c in zip(prompts, [completions[j] for j in partners]))
    seqs = SplitSequences(split, partners, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, chunk_rows=5)
    assert len(seqs) == 2 * len(split) and seqs.has_kl
    assert seqs.keys.tolist() == [sequence_key(p, c) for p, c in want]
    assert seqs.lengths.tolist() == [len(p) + len(c) for p, c in want]
    order = [len(want) - 1, 0, len(split), 3, len(split) + 2, 3]  # any order, repeats, both kinds
    assert seqs.fetch(order) == [want[i] for i in order]
    assert seqs.fetch([]) == []
    with pytest.raises(IndexError):
        seqs.fetch([len(want)])


def test_targets_only_without_partners():
    split, prompts, completions = _split(7)
    seqs = SplitSequences(split, None, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
    assert len(seqs) == 7 and not seqs.has_kl
    assert seqs.keys.tolist() == [sequence_key(p, c) for p, c in zip(prompts, completions)]


def test_concatenated_parts_fetch_from_the_right_split():
    a, pa, ca = _split(6)
    b, pb, cb = _split(4, offset=50)
    first = SplitSequences(a, dataset_kl_partners(a.prompt_key), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
    second = SplitSequences(b, None, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
    pairs = PairSequences([([9], [8, 7])])
    both = ConcatSequences([first, second, pairs])
    want = first.fetch(range(12)) + list(zip(pb, cb)) + [([9], [8, 7])]
    assert len(both) == 17
    assert np.array_equal(both.keys, np.concatenate([first.keys, second.keys, pairs.keys]))
    assert both.fetch([16, 0, 13, 11, 12]) == [want[i] for i in (16, 0, 13, 11, 12)]


def test_keys_computed_in_shards_and_gathered_equal_the_whole_pass():
    """Three ranks each hash a third of the rows (23 rows: 7, 8, 8); gathered in rank order, the
    arrays equal one process's pass over the whole split, targets then KL rows."""
    split, _, _ = _split()
    partners = dataset_kl_partners(split.prompt_key)
    whole = SplitSequences(split, partners, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
    ranks = [SplitSequences(split, partners, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, chunk_rows=3)
             for _ in range(3)]
    mine = [r._walk(len(split) * k // 3, len(split) * (k + 1) // 3) for k, r in enumerate(ranks)]
    assert [len(m[0]) for m in mine] == [7, 8, 8]
    for k, r in enumerate(ranks):
        r.fill_keys(k, 3, gather=lambda _: mine)
        assert np.array_equal(r.keys, whole.keys) and np.array_equal(r.lengths, whole.lengths)
    both = ConcatSequences([SplitSequences(split, None, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT),
                            PairSequences([([9], [8, 7])])])
    both.fill_keys()
    assert both.keys.tolist() == whole.keys[:len(split)].tolist() + [sequence_key([9], [8, 7])]
    with pytest.raises(ValueError, match="the shards hold 7 rows, the split 23"):
        ranks[0].fill_keys(0, 3, gather=lambda m: [m])
