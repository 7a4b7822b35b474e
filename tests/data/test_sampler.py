"""KTOBatchSampler: class ratio per batch, batch order, epochs, resume, determinism."""

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megakto.data.kl_pairs import kl_partners
from megakto.data.sampler import KTOBatchSampler

REPO = Path(__file__).resolve().parents[2]


def _labels(n: int, n_desirable: int, seed: int = 0) -> list[bool]:
    labels = [True] * n_desirable + [False] * (n - n_desirable)
    random.Random(seed).shuffle(labels)
    return labels


def _run(sampler: KTOBatchSampler, n: int) -> list[list[int]]:
    return [sampler.next_global_batch() for _ in range(n)]


def test_class_counts_follow_dataset_ratio_by_cumulative_rounding():
    """N = 100, 30 desirable, G = 8: G * p = 2.4 desirable rows per batch. Batch b takes
    round(2.4 (b+1)) - round(2.4 b), so the first batches take 2, 3, 2, 3, 2 (cumulative 2, 5,
    7, 10, 12 = round(2.4), round(4.8), round(7.2), round(9.6), round(12.0)); every batch has 2 or
    3 and after b batches exactly round(2.4 b) have been used."""
    labels = _labels(100, 30)
    s = KTOBatchSampler(labels, global_batch_size=8, seed=0)
    counts = [sum(labels[i] for i in b) for b in _run(s, 250)]
    assert counts[:5] == [2, 3, 2, 3, 2]
    assert set(counts) == {2, 3}
    for b in range(251):
        assert sum(counts[:b]) == int(2.4 * b + 0.5 + 1e-9)


@pytest.mark.parametrize("n_desirable", [0, 100])
def test_single_class_dataset_draws_from_the_other_class(n_desirable):
    labels = _labels(100, n_desirable)
    s = KTOBatchSampler(labels, global_batch_size=10, seed=1)
    batches = _run(s, 10)
    assert all(labels[i] == bool(n_desirable) for b in batches for i in b)
    assert Counter(i for b in batches for i in b) == Counter(range(100))


def test_balanced_batch_is_its_desirable_rows_then_its_undesirable_rows():
    """N = 100, 30 desirable, G = 8: batch b holds round(2.4 (b+1)) - round(2.4 b) desirable rows
    (2, 3, 2, 3, 2, ...) first, then the undesirable rest; each class in its stream's order, so
    the batches concatenated per class are the two streams."""
    labels = _labels(100, 30, seed=4)
    s = KTOBatchSampler(labels, global_batch_size=8, seed=5)
    batches = _run(s, 12)  # 29 desirable, 67 undesirable: no stream wraps
    for batch, n_d in zip(batches, [2, 3, 2, 3, 2]):
        assert [labels[i] for i in batch] == [True] * n_d + [False] * (8 - n_d)
    for batch in batches:
        flags = [labels[i] for i in batch]
        assert flags == sorted(flags, reverse=True)
    desirable = [i for b in batches for i in b if labels[i]]
    undesirable = [i for b in batches for i in b if not labels[i]]
    assert desirable == s._desirable._order(0)[:29].tolist()
    assert undesirable == s._undesirable._order(0)[:67].tolist()


def test_unbalanced_one_epoch_uses_every_index_once():
    """N = 96, G = 16: 6 batches are exactly one epoch, the next 6 exactly the second."""
    labels = _labels(96, 30, seed=6)
    s = KTOBatchSampler(labels, global_batch_size=16, seed=7, balanced=False)
    first = [i for b in _run(s, 6) for i in b]
    assert sorted(first) == list(range(96))
    assert s.epoch == 1
    second = [i for b in _run(s, 6) for i in b]
    assert sorted(second) == list(range(96))
    assert first != second  # a fresh permutation per epoch
    assert first != list(range(96))


def test_unbalanced_epoch_tail_carries_into_the_next_batch():
    """N = 100, G = 16: the first 100 rows handed out (6 batches + 4 rows of the 7th) are each
    index once; the 7th batch's last 12 rows start epoch 1. Nothing is dropped."""
    s = KTOBatchSampler([True] * 50 + [False] * 50, global_batch_size=16, seed=8, balanced=False)
    rows = [i for b in _run(s, 7) for i in b]
    assert sorted(rows[:100]) == list(range(100))
    assert len(set(rows[100:])) == 12
    assert s.epoch == 112 // 100 == 1


def test_balanced_streams_use_each_row_once_per_epoch():
    """N = 100: 30 desirable, 70 undesirable, G = 8. Desirable rows used after b batches:
    round(2.4 b): 29 after 12, 31 after 13. Undesirable: 8b minus that: 67 after 12, 73 after 13.
    So after 12 batches no row has repeated; after 13 every row of both classes has been seen."""
    labels = _labels(100, 30, seed=9)
    s = KTOBatchSampler(labels, global_batch_size=8, seed=10)
    batches = _run(s, 12)
    rows = [i for b in batches for i in b]
    assert len(rows) == len(set(rows)) == 96
    assert sum(labels[i] for i in rows) == 29
    assert s.epoch == 0
    rows += s.next_global_batch()
    assert set(rows) == set(range(100))
    assert sum(labels[i] for i in rows) == 31
    assert s.epoch == 1
    # Over 10 epochs (125 batches = 1000 rows), every row is used exactly 10 times.
    rows += [i for b in _run(s, 112) for i in b]
    assert Counter(rows) == Counter({i: 10 for i in range(100)})


def test_resume_continues_the_same_stream():
    labels = _labels(50, 17, seed=11)
    for balanced in (True, False):
        kw = dict(global_batch_size=6, seed=12, balanced=balanced)
        full = _run(KTOBatchSampler(labels, **kw), 17)
        first = KTOBatchSampler(labels, **kw)
        assert _run(first, 7) == full[:7]
        state = json.loads(json.dumps(first.state_dict()))  # plain ints survive JSON
        assert all(type(v) is int for v in state.values())
        assert state["batches_emitted"] == 7
        resumed = KTOBatchSampler(labels, **kw)
        resumed.load_state_dict(state)
        assert resumed.epoch == first.epoch == 42 // 50
        assert _run(resumed, 10) == full[7:17]


def test_resume_ignores_an_old_states_num_micro_batches():
    """Earlier versions recorded the micro-batch count in the state; it no longer matters."""
    labels = _labels(64, 20, seed=13)
    full = _run(KTOBatchSampler(labels, global_batch_size=8, seed=0), 12)
    first = KTOBatchSampler(labels, global_batch_size=8, seed=0)
    _run(first, 5)
    state = {**first.state_dict(), "num_micro_batches": 4}
    assert "num_micro_batches" not in first.state_dict()
    resumed = KTOBatchSampler(labels, global_batch_size=8, seed=0)
    resumed.load_state_dict(state)
    assert _run(resumed, 7) == full[5:]


@pytest.mark.parametrize(
    "key,labels,kw",
    [
        ("num_rows", [True, False] * 21, dict(global_batch_size=6, seed=0)),
        ("num_desirable", [True] * 21 + [False] * 19, dict(global_batch_size=6, seed=0)),
        ("labels_crc32", [False] * 25 + [True] * 15, dict(global_batch_size=6, seed=0)),
        ("global_batch_size", [True] * 15 + [False] * 25, dict(global_batch_size=8, seed=0)),
        ("seed", [True] * 15 + [False] * 25, dict(global_batch_size=6, seed=1)),
    ],
)
def test_mismatched_state_raises_naming_the_parameter(key, labels, kw):
    saved = KTOBatchSampler([True] * 15 + [False] * 25, global_batch_size=6, seed=0)
    _run(saved, 3)
    other = KTOBatchSampler(labels, **kw)
    with pytest.raises(ValueError, match=f"mismatch: {key} is"):
        other.load_state_dict(saved.state_dict())


def test_inconsistent_state_raises():
    labels = [True] * 15 + [False] * 25
    s = KTOBatchSampler(labels, global_batch_size=6, seed=0)
    _run(s, 3)
    fresh = KTOBatchSampler(labels, global_batch_size=6, seed=0)
    state = s.state_dict()
    state["desirable_consumed"] += 1
    with pytest.raises(ValueError, match="desirable_consumed"):
        fresh.load_state_dict(state)
    state = s.state_dict()
    state["balanced"] = 0
    with pytest.raises(ValueError, match="balanced"):
        fresh.load_state_dict(state)


def test_constructor_errors():
    with pytest.raises(ValueError, match="global_batch_size must be >= 1; got 0"):
        KTOBatchSampler([True, False] * 10, global_batch_size=0, seed=0)
    with pytest.raises(ValueError, match="exceeds the dataset's 20 rows"):
        KTOBatchSampler([True, False] * 10, global_batch_size=32, seed=0)
    with pytest.raises(ValueError):
        KTOBatchSampler([], global_batch_size=1, seed=0)


@pytest.mark.gloo
def test_same_in_a_separate_process_and_no_global_rng():
    labels = _labels(40, 13, seed=14)
    random.seed(0)
    torch.manual_seed(0)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    here = _run(KTOBatchSampler(labels, global_batch_size=8, seed=15), 12)
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    code = (
        "from megakto.data.sampler import KTOBatchSampler;"
        f"s = KTOBatchSampler({labels!r}, global_batch_size=8, seed=15);"
        "print([s.next_global_batch() for _ in range(12)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(REPO), "PYTHONHASHSEED": "777", "OMP_NUM_THREADS": "1"},
    )
    assert eval(out.stdout.strip()) == here
    assert here != _run(KTOBatchSampler(labels, global_batch_size=8, seed=16), 12)


def test_paired_dataset_batches_always_get_foreign_kl_partners():
    """A converted paired dataset: rows 2k (desirable) and 2k+1 (undesirable) share prompt k.
    Balanced sampling keeps both halves of a pair apart or together at random; either way every
    global batch's KL partners (computed from its prompt keys) are foreign and a permutation."""
    n = 64
    labels = [i % 2 == 0 for i in range(n)]
    prompt_key = [i // 2 for i in range(n)]
    s = KTOBatchSampler(labels, global_batch_size=8, seed=17)
    for step in range(40):
        batch = s.next_global_batch()
        keys = [prompt_key[i] for i in batch]
        partner = kl_partners(keys, seed=17, step=step)
        assert sorted(partner) == list(range(8))
        assert all(keys[j] != keys[i] for i, j in enumerate(partner))
