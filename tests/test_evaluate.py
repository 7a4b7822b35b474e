"""Evaluator on one process: hand-worked metrics, the reference scored once, and ranks by slicing
(the shares of two data-parallel ranks add up to the whole, with equal numbers of forward calls)."""

import math

import pytest
import torch
from datasets import Dataset

from megakto.data.split import TokenizedSplit
from megakto.distributed import comm
from megakto.evaluate import Evaluator
from megakto.reference.sequences import SplitSequences

# Prompt A = [1, 2] and prompt B = [3, 4], each with a desirable and an undesirable completion.
PROMPTS = [[1, 2], [1, 2], [3, 4], [3, 4]]
COMPLETIONS = [[10], [11], [12], [13]]
LABELS = [True, False, True, False]
KL_ROWS = [([1, 2], [12]), ([1, 2], [13]), ([3, 4], [10]), ([3, 4], [11])]  # each prompt, another's completion
# Reference: -1 everywhere. Policy: log-ratios 0.5, -1, -0.5, 0 on the targets; 0.2, 0.4, 0, 0.2 on the KL rows.
POLICY = {(1, 2, 10): -0.5, (1, 2, 11): -2.0, (3, 4, 12): -1.5, (3, 4, 13): -1.0,
          (1, 2, 12): -0.8, (1, 2, 13): -0.6, (3, 4, 10): -1.0, (3, 4, 11): -0.8}


def _split():
    ds = Dataset.from_dict({"prompt_ids": PROMPTS, "completion_ids": COMPLETIONS, "label": LABELS,
                            "prompt_key": [0, 0, 1, 1]})
    return TokenizedSplit(ds)


def _evaluator(dp_rank=0, dp_size=1, batch_size=2):
    split = _split()
    # Partners 2, 3, 0, 1 give KL_ROWS; the rows are read from the split's Arrow table per batch.
    sequences = SplitSequences(split, [2, 3, 0, 1], max_length=16, max_prompt_length=8)
    assert sequences.fetch(range(8)) == list(zip(PROMPTS, COMPLETIONS)) + KL_ROWS
    return Evaluator(split, sequences, has_kl=True, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size,
                     dp_group=comm.world_group())


def _policy(pairs):
    return torch.tensor([POLICY[(*p, *c)] for p, c in pairs])


class _Reference:
    def __init__(self):
        self.calls = 0

    def __call__(self, pairs):
        self.calls += 1
        return torch.full((len(pairs),), -1.0)


def test_hand_worked_metrics_and_one_reference_pass():
    """beta = 1. z_ref = mean(0.2, 0.4, 0, 0.2) = 0.2. Rewards 0.5, -1, -0.5, 0: prompt A ranks its
    pair right, prompt B wrong -> accuracy 1/2, margin ((0.5 + 1) + (-0.5 - 0)) / 2 = 0.5.
    z - z_ref = 0.3, -1.2, -0.7, -0.2; loss = mean(σ(-0.3), σ(-1.2), σ(0.7), σ(-0.2))."""
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ref = _Reference()
    ev = _evaluator()
    m = ev(_policy, ref, beta=1.0, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto")
    assert m["kl"] == pytest.approx(0.2, abs=1e-7)
    assert m["reward_accuracy"] == 0.5 and m["pairs"] == 2.0
    assert m["rewards/margins"] == pytest.approx(0.5, abs=1e-12)
    assert m["loss"] == pytest.approx((sig(-0.3) + sig(-1.2) + sig(0.7) + sig(-0.2)) / 4, abs=1e-7)
    calls = ref.calls
    assert calls == 4  # 8 rows (targets and KL rows) in batches of 2
    ev(_policy, ref, beta=1.0, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto")
    assert ref.calls == calls  # the frozen reference is scored once per run, not per evaluation


def test_ranks_by_slicing():
    rows = list(zip(PROMPTS, COMPLETIONS)) + KL_ROWS
    whole = _evaluator()._gather(_policy)
    counts, parts = [], []
    for rank in (0, 1):
        calls = []
        parts.append(_evaluator(rank, 2, batch_size=3)._gather(lambda p: calls.append(len(p)) or _policy(p)))
        counts.append(len(calls))
    assert counts == [2, 2]  # 4 rows each in batches of 3: every rank makes the same calls
    assert torch.equal(parts[0] + parts[1], whole)
    assert torch.equal(whole, torch.tensor([POLICY[(*p, *c)] for p, c in rows]).double())
