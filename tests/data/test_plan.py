"""plan_micro_batches: equal rows, near-equal tokens, both classes, deterministic."""

import random

import pytest

from megakto.data.packing import plan_micro_batches
from megakto.data.sampler import KTOBatchSampler


def test_hand_worked():
    """lengths 9 8 7 6 5 4 3 2, labels D D D D U U U U, 2 micro-batches of 4.
    Desirable (2 each), longest first to the lightest with room: 9->0, 8->1, 7->1 (8 < 9),
    6->0 (1 is full): loads 15, 15. Undesirable: 5->0 (tie, lower index) 20/15, 4->1 20/19,
    3->1 20/22, 2->0 22/22."""
    plan = plan_micro_batches([9, 8, 7, 6, 5, 4, 3, 2], [True] * 4 + [False] * 4, 2)
    assert plan == [[0, 3, 4, 7], [1, 2, 5, 6]]


@pytest.mark.parametrize("bins,size", [(1, 8), (2, 4), (4, 4), (8, 2)])
def test_invariants(bins, size):
    rng = random.Random(bins)
    n = bins * size
    for _ in range(50):
        lengths = [rng.randint(10, 500) for _ in range(n)]
        labels = [rng.random() < 0.4 for _ in range(n)]
        plan = plan_micro_batches(lengths, labels, bins)
        assert sorted(i for g in plan for i in g) == list(range(n))
        assert all(len(g) == size for g in plan)
        n_d = sum(labels)
        for g in plan:
            d = sum(labels[i] for i in g)
            assert n_d // bins <= d <= -(-n_d // bins)
            if n_d >= bins and n - n_d >= bins:
                assert 0 < d < len(g)
        loads = [sum(lengths[i] for i in g) for g in plan]
        assert max(loads) - min(loads) <= 2 * max(lengths)
        assert plan == plan_micro_batches(lengths, labels, bins)


def test_balances_better_than_fixed_slices():
    rng = random.Random(0)
    spread_plan = spread_fixed = 0
    for _ in range(100):
        lengths = [rng.randint(10, 500) for _ in range(32)]
        labels = [i % 2 == 0 for i in range(32)]
        plan = plan_micro_batches(lengths, labels, 4)
        loads = [sum(lengths[i] for i in g) for g in plan]
        fixed = [sum(lengths[k * 8:(k + 1) * 8]) for k in range(4)]
        spread_plan += max(loads) - min(loads)
        spread_fixed += max(fixed) - min(fixed)
    assert spread_plan * 5 < spread_fixed


@pytest.mark.parametrize("g,m,guaranteed", [(16, 4, 100), (12, 4, 60), (8, 8, 0), (24, 3, 100)])
def test_sampler_batches_plan_into_mixed_micro_batches(g, m, guaranteed):
    """What the trainer does: sampler batch -> plan. 30 % desirable. (16, 4): 4.8 desirable per
    batch -> 4 or 5 >= M = 4, always mixed. (12, 4): 3.6 -> 3 or 4; only batches with 4
    desirable (60 of the first 100) are guaranteed mixed. (8, 8): one row per micro-batch, never.
    (24, 3): 7.2 -> 7 or 8, always mixed."""
    rng = random.Random(2)
    labels = [True] * 60 + [False] * 140
    rng.shuffle(labels)
    sampler = KTOBatchSampler(labels, global_batch_size=g, seed=3)
    mixed = 0
    for _ in range(100):
        batch = sampler.next_global_batch()
        flags = [labels[i] for i in batch]
        n_d = sum(flags)
        if n_d >= m and g - n_d >= m:
            mixed += 1
            plan = plan_micro_batches([rng.randint(10, 500) for _ in batch], flags, m)
            for mb in plan:
                assert {flags[i] for i in mb} == {True, False}, (batch, plan)
    assert mixed == guaranteed
