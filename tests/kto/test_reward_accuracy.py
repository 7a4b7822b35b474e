"""megakto.kto.reward_accuracy: the mean over every same-prompt (desirable, undesirable) pair of
1 (desirable reward higher), 0.5 (tie) or 0, and the mean reward margin over those pairs."""

import math

import torch

from megakto.kto.reward_accuracy import RewardAccuracy, reward_accuracy


def test_pairs_within_each_prompt_only_with_ties_and_unpaired_prompts():
    """Prompt 7: desirable 0.5, -0.25 vs undesirable 0.0 -> pairs 1, 0 (margins 0.5, -0.25).
    Prompt 9: desirable 1.0 vs undesirable 1.0, 2.0 -> pairs 0.5 (tie), 0 (margins 0, -1).
    Prompt 11 has only a desirable row, prompt 13 only an undesirable one: no pairs.
    Accuracy (1 + 0 + 0.5 + 0) / 4 = 0.375; margin (0.5 - 0.25 + 0 - 1) / 4 = -0.1875.
    Rows are interleaved: pairing follows the keys, not the positions."""
    rewards = torch.tensor([1.0, 0.5, 3.0, 0.0, 2.0, -1.0, -0.25, 1.0])
    desirable = [True, True, True, False, False, False, True, False]
    keys = [9, 7, 11, 7, 9, 13, 7, 9]
    assert reward_accuracy(rewards, desirable, keys) == RewardAccuracy(0.375, -0.1875, 4)


def test_several_completions_on_one_prompt_count_every_pair():
    """Desirable 3, 1 vs undesirable 2, 0, 1: 3 beats all three (3), 1 loses to 2, beats 0, ties 1
    (1.5): 4.5 / 6 = 0.75. Margins 1 + 3 + 2 - 1 + 1 + 0 = 6, / 6 = 1."""
    rewards = torch.tensor([3.0, 2.0, 1.0, 0.0, 1.0])
    desirable = [True, False, True, False, False]
    assert reward_accuracy(rewards, desirable, [5] * 5) == RewardAccuracy(0.75, 1.0, 6)


def test_pairs_weigh_equally_across_prompts():
    """Prompt 1 has 2 x 2 pairs all right, prompt 2 one pair wrong: 4 / 5 = 0.8, not the mean of the
    prompts' accuracies (1 + 0) / 2. Margins (4 * 1 - 1) / 5 = 0.6."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    desirable = [True, True, False, False, True, False]
    acc = reward_accuracy(rewards, desirable, [1, 1, 1, 1, 2, 2])
    assert acc.pairs == 5 and acc.accuracy == 0.8 and acc.margin == 0.6


def test_step_zero_every_reward_zero_is_exactly_one_half():
    acc = reward_accuracy(torch.zeros(6), [True, False, True, False, False, True], [1, 1, 2, 2, 2, 2])
    assert acc == RewardAccuracy(0.5, 0.0, 1 + 2 * 2)


def test_no_pair_gives_nan():
    for desirable, keys in (([True, True, False], [1, 1, 2]), ([True, True], [1, 2]), ([], [])):
        acc = reward_accuracy(torch.zeros(len(keys)), desirable, keys)
        assert acc.pairs == 0 and math.isnan(acc.accuracy) and math.isnan(acc.margin)
