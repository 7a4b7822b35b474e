"""megakto.optim: the learning-rate multiplier at hand-computed steps, and the weight-decay split.

The schedules below use warmup_steps=4, max_steps=12, so decay runs over 12 - 4 = 8 steps and
step s >= 4 is at progress (s - 4) / 8, clamped to 1:

    warm-up    s = 0, 1, 2, 3 -> (s + 1) / 4 = 0.25, 0.5, 0.75, 1.0
    cosine     shape 0.5 * (1 + cos(pi * progress)); linear: shape 1 - progress
    min ratio  m + (1 - m) * shape
"""

import math

import pytest
import torch
from torch import nn

from megakto.optim import lr_multiplier, param_groups


def lr(step, schedule, min_lr_ratio=0.0, warmup_steps=4, max_steps=12):
    return lr_multiplier(step, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule,
                         min_lr_ratio=min_lr_ratio)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_up_to_the_peak(schedule):
    assert [lr(s, schedule, min_lr_ratio=0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine():
    assert lr(4, "cosine") == 1.0  # progress 0
    assert lr(6, "cosine") == pytest.approx(0.5 + 0.25 * math.sqrt(2))  # 0.5 * (1 + cos(pi/4)) = 0.8536
    assert lr(8, "cosine") == pytest.approx(0.5)  # progress 1/2
    assert lr(12, "cosine") == 0.0 and lr(20, "cosine") == 0.0  # progress 1, then clamped


def test_cosine_min_lr_ratio():
    assert lr(4, "cosine", 0.1) == 1.0
    assert lr(8, "cosine", 0.1) == pytest.approx(0.55)  # 0.1 + 0.9 * 0.5
    assert lr(12, "cosine", 0.1) == pytest.approx(0.1) and lr(50, "cosine", 0.1) == pytest.approx(0.1)


def test_linear():
    assert [lr(s, "linear") for s in (4, 6, 8, 10, 12, 13)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert lr(6, "linear", 0.1) == pytest.approx(0.775)  # 0.1 + 0.9 * 0.75
    assert lr(10, "linear", 0.1) == pytest.approx(0.325)  # 0.1 + 0.9 * 0.25
    assert lr(12, "linear", 0.1) == pytest.approx(0.1)


def test_constant_ignores_min_lr_ratio():
    assert [lr(s, "constant", 0.1) for s in (4, 12, 1000)] == [1.0, 1.0, 1.0]


def test_no_warmup_starts_at_the_peak():
    # decay over 10 steps: step 5 is progress 1/2
    assert lr(0, "cosine", warmup_steps=0, max_steps=10) == 1.0
    assert lr(5, "cosine", warmup_steps=0, max_steps=10) == pytest.approx(0.5)
    assert lr(5, "linear", warmup_steps=0, max_steps=10) == 0.5


def test_warmup_as_long_as_training_decays_over_one_step():
    # max(1, 4 - 4) = 1 decay step: step 4 is progress 0, step 5 progress 1
    assert lr(4, "linear", 0.2, warmup_steps=4, max_steps=4) == 1.0
    assert lr(5, "linear", 0.2, warmup_steps=4, max_steps=4) == pytest.approx(0.2)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match=r"^unknown schedule 'step'; expected cosine, linear or constant$"):
        lr(4, "step")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 2)
        self.proj = nn.Linear(2, 3)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_param_groups_no_decay_on_biases_and_norms():
    model = _Tiny()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model.embed.weight), id(model.proj.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)]
    # Frozen parameters are in neither group.
    assert set(decay) == set(no_decay) == {"params", "weight_decay"}


def test_param_groups_use_the_full_shape_of_a_partitioned_parameter():
    """A ZeRO-3 partition is an empty 1-D tensor locally; ``ds_shape`` keeps the full shape."""
    model = nn.Module()
    model.weight = nn.Parameter(torch.empty(0))
    model.weight.ds_shape = torch.Size([4, 3])
    model.bias = nn.Parameter(torch.empty(0))
    model.bias.ds_shape = torch.Size([4])
    decay, no_decay = param_groups(model, weight_decay=0.01)
    assert [id(p) for p in decay["params"]] == [id(model.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(model.bias)]
