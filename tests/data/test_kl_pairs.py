"""kl_partners: mismatched pairs over the global batch, identical on every rank."""

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megakto.data.kl_pairs import kl_partners
from megakto.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _assert_derangement(keys, partner):
    assert sorted(partner) == list(range(len(keys)))
    for i, j in enumerate(partner):
        assert keys[j] != keys[i], (i, j, keys)


def _assert_mismatched(keys, partner):
    assert len(partner) == len(keys)
    for i, j in enumerate(partner):
        assert 0 <= j < len(keys) and keys[j] != keys[i], (i, j, keys)


def _random_keys(rng: random.Random, g: int, max_group: int) -> list[int]:
    """G keys whose largest same-prompt group has exactly `max_group` members (<= G/2)."""
    keys = [0] * max_group
    next_key = 1
    while len(keys) < g:
        size = rng.randint(1, min(max_group, g - len(keys)))
        keys += [next_key] * size
        next_key += 1
    rng.shuffle(keys)
    return [k * 7919 + 3 for k in keys]  # arbitrary large-ish keys, not positions


def test_derangement_for_random_group_structures():
    """300 random batches, G in 2..64, largest group anywhere from 1 to exactly G/2."""
    rng = random.Random(1234)
    for trial in range(300):
        g = rng.randint(2, 64)
        m = rng.randint(1, g // 2)
        keys = _random_keys(rng, g, m)
        assert max(Counter(keys).values()) == m
        _assert_derangement(keys, kl_partners(keys, seed=trial, step=trial * 3))


@pytest.mark.parametrize("g", [4, 6, 16, 64])
def test_converted_paired_dataset_layout(g):
    """(x, y_w), (x, y_l) adjacent: keys [0,0,1,1,...]; a +1 rotation would pair row 0 with row 1
    (same prompt) -- here every row gets a foreign completion and every completion is used once."""
    keys = [i // 2 for i in range(g)]
    for step in range(20):
        _assert_derangement(keys, kl_partners(keys, seed=0, step=step))


def test_two_groups_of_exactly_half_swap_between_groups():
    """Keys [A]*5 + [B]*5: m = 5 = G/2, so each A row must take a B completion and vice versa,
    and since it is a permutation, the 5 A rows use all 5 B completions."""
    keys = [10] * 5 + [20] * 5
    for step in range(10):
        p = kl_partners(keys, seed=7, step=step)
        _assert_derangement(keys, p)
        assert sorted(p[:5]) == [5, 6, 7, 8, 9]
        assert sorted(p[5:]) == [0, 1, 2, 3, 4]


def test_global_batch_of_two_is_the_swap():
    for seed in range(5):
        assert kl_partners([11, 42], seed=seed, step=seed) == [1, 0]


def test_uses_no_global_rng_state():
    keys = list(range(12))
    random.seed(0)
    torch.manual_seed(0)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    first = kl_partners(keys, seed=5, step=9)
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    random.seed(999)
    torch.manual_seed(999)
    assert kl_partners(keys, seed=5, step=9) == first


@pytest.mark.gloo
def test_same_in_a_separate_process_and_varies_with_step_and_seed():
    keys = [i // 2 for i in range(32)]
    here = kl_partners(keys, seed=3, step=17)
    code = (
        "from megakto.data.kl_pairs import kl_partners;"
        f"print(kl_partners({keys!r}, seed=3, step=17))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"},
    )
    assert eval(out.stdout.strip()) == here
    # 32 rows, 16 pairs: the chance that two different (seed, step) draws coincide is negligible.
    by_step = {tuple(kl_partners(keys, seed=3, step=s)) for s in range(10)}
    assert len(by_step) == 10
    assert kl_partners(keys, seed=4, step=17) != here


def test_partners_depend_on_keys_not_key_values():
    """Relabelling the prompts (same grouping) with the same seed/step gives the same partners."""
    keys = [0, 0, 1, 1, 2, 2, 3, 3]
    relabelled = [k * 1000 + 17 for k in keys]
    assert kl_partners(keys, seed=1, step=2) == kl_partners(relabelled, seed=1, step=2)


@pytest.mark.parametrize(
    "keys,step",
    [([123], 0), ([5, 5, 5, 5, 5], 3), ([9, 9], 41)],
)
def test_single_prompt_batch_raises(keys, step):
    with pytest.raises(DataError) as err:
        kl_partners(keys, seed=0, step=step)
    msg = str(err.value)
    head = f"all {len(keys)} examples of the global batch at step {step} share one prompt"
    assert msg.startswith(head)
    assert "kto.loss_type=apo_zero_unpaired" in msg
    assert "\n" not in msg


def test_empty_batch_raises():
    with pytest.raises(ValueError):
        kl_partners([], seed=0, step=0)


def test_dominant_group_falls_back_to_uniform_foreign_partners():
    """Keys [A]*7 + [B, C, D]: m = 7 > G/2 = 5, no derangement exists (7 A rows, 3 foreign
    completions). Every partner is still foreign; an A row's partner is uniform over rows 7, 8, 9
    (expect 1/3 each over 3000 steps: sd = sqrt(3000 * 1/3 * 2/3) ~ 26, so +-130 is 5 sd), and
    row 7 (B)'s partner is uniform over the other 9 rows (expect 333 each, sd ~ 18, +-100)."""
    keys = [1] * 7 + [2, 3, 4]
    a_counts, b_counts = Counter(), Counter()
    for step in range(3000):
        p = kl_partners(keys, seed=11, step=step)
        _assert_mismatched(keys, p)
        a_counts[p[0]] += 1
        b_counts[p[7]] += 1
    assert set(a_counts) == {7, 8, 9}
    assert all(abs(c - 1000) < 130 for c in a_counts.values()), a_counts
    assert set(b_counts) == {0, 1, 2, 3, 4, 5, 6, 8, 9}
    assert all(abs(c - 3000 / 9) < 100 for c in b_counts.values()), b_counts


def test_dominant_group_random_configs_never_same_prompt():
    rng = random.Random(99)
    for trial in range(200):
        g = rng.randint(3, 50)
        m = rng.randint(g // 2 + 1, g - 1)
        keys = [0] * m + [rng.randint(1, 4) for _ in range(g - m)]
        rng.shuffle(keys)
        _assert_mismatched(keys, kl_partners(keys, seed=trial, step=0))


def _list_kl_partners(prompt_keys, *, seed, step):
    """The list-and-dict implementation kl_partners had before it was vectorised, kept as the
    reference: every cache of KL-row log-probs and every golden loss was made with its draws."""
    from megakto.data.kl_pairs import _rng

    keys = [int(k) for k in prompt_keys]
    g = len(keys)
    groups = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    rng = _rng(seed, step)
    blocks = list(groups.values())
    for block in blocks:
        rng.shuffle(block)
    rng.shuffle(blocks)
    largest = max(len(block) for block in blocks)
    partner = [0] * g
    s = [i for block in blocks for i in block]
    if 2 * largest <= g:
        for k, i in enumerate(s):
            partner[i] = s[(k + largest) % g]
        return partner
    p = 0
    for block in blocks:
        a = len(block)
        for i in block:
            r = rng.randrange(g - a)
            partner[i] = s[r] if r < p else s[r + a]
        p += a
    return partner


def test_vectorised_partners_draw_exactly_what_the_list_version_drew():
    """Same partners for batches, converted paired data, all-distinct prompts, dominant groups
    (the fallback) and a split of 20,000 rows: caches and golden losses stay valid."""
    from megakto.data.kl_pairs import dataset_kl_partners

    rng = random.Random(5)
    cases = [_random_keys(rng, g, m) for g, m in [(2, 1), (8, 4), (16, 3), (64, 1), (200, 20)]]
    cases += [[k // 2 for k in range(40)], [0] * 7 + [1, 2], [3] * 30 + list(range(10, 18))]
    cases.append([rng.randrange(1 << 63) for _ in range(20_000)])
    for keys in cases:
        for seed, step in [(0, 0), (3, 17)]:
            assert kl_partners(keys, seed=seed, step=step) == _list_kl_partners(keys, seed=seed, step=step)
    paired = [k // 2 * 104729 for k in range(20_000)]
    assert dataset_kl_partners(paired).tolist() == _list_kl_partners(paired, seed=0, step=0)
