"""Held-out reward accuracy of the implicit reward r = β·(log πθ(y|x) − log πref(y|x)).

Over every prompt that has both a desirable and an undesirable completion, each (desirable,
undesirable) pair scores 1 when the desirable completion has the higher implicit reward, 0.5 on a
tie and 0 otherwise; the accuracy is the mean over all such pairs. At step 0 the policy equals the
reference, every reward is 0 and the accuracy is exactly 0.5.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple, Sequence

import torch

__all__ = ["RewardAccuracy", "reward_accuracy"]


class RewardAccuracy(NamedTuple):
    accuracy: float  # share of (desirable, undesirable) same-prompt pairs ranked correctly; ties 0.5
    margin: float  # mean of r_desirable − r_undesirable over those pairs
    pairs: int  # number of pairs (0 -> accuracy and margin are NaN)


def reward_accuracy(rewards: torch.Tensor, desirable: Sequence[bool], prompt_keys: Sequence[int]) -> RewardAccuracy:
    groups: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r, d, k in zip(rewards.tolist(), desirable, prompt_keys):
        groups[k][0 if d else 1].append(r)
    score = margin = 0.0
    pairs = 0
    for good, bad in groups.values():
        if not good or not bad:
            continue
        g = torch.tensor(good, dtype=torch.float64)[:, None]
        b = torch.tensor(bad, dtype=torch.float64)[None, :]
        score += float((g > b).sum() + 0.5 * (g == b).sum())
        margin += float((g - b).sum())
        pairs += g.numel() * b.numel()
    if pairs == 0:
        return RewardAccuracy(float("nan"), float("nan"), 0)
    return RewardAccuracy(score / pairs, margin / pairs, pairs)
