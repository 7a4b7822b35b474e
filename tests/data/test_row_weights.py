"""Per-row weights from the data's ``weight`` column through tokenizing, the held split and the
eq. (8) balance check at start-up (megakto/startup.py::desirable_weight)."""

from types import SimpleNamespace

import pytest

from megakto.data.rows import load_rows
from megakto.data.split import TokenizedSplit
from megakto.data.tokenize import tokenize_rows
from megakto.startup import desirable_weight

ROWS = [
    {"prompt": "the cat", "completion": "sat", "label": True, "weight": 0.5},
    {"prompt": "a dog", "completion": "ran", "label": False, "weight": 2.0},
    {"prompt": "what is red", "completion": "a hat", "label": True, "weight": 1.5},
    {"prompt": "why", "completion": "no", "label": False, "weight": 0.0},
]


def _split(write, tokenizer, rows):
    tok, _ = tokenize_rows(load_rows(write(rows)), tokenizer, max_length=32)
    return TokenizedSplit(tok)


def _cfg(desirable_weight, undesirable_weight=1.0):
    return SimpleNamespace(kto=SimpleNamespace(desirable_weight=desirable_weight,
                                               undesirable_weight=undesirable_weight),
                           data=SimpleNamespace(train_files=["train.jsonl"]))


def test_weights_reach_the_batches_rows(write, tokenizer):
    split = _split(write, tokenizer, ROWS)
    assert split.weight.tolist() == [0.5, 2.0, 1.5, 0.0]
    assert split.fetch([2, 0])["weight"] == [1.5, 0.5]
    assert split.class_weights() == (2.0, 2.0)


def test_unweighted_rows_have_no_weight_anywhere(write, tokenizer):
    split = _split(write, tokenizer, [{k: v for k, v in r.items() if k != "weight"} for r in ROWS])
    assert split.weight is None and "weight" not in split.fetch([0])
    assert split.class_weights() == (2.0, 2.0)


def test_eq8_balances_the_summed_weights_not_the_row_counts(write, tokenizer):
    """Row counts 2 and 2 would give λD = 1; summed weights W_D = 0.5 + 1.5 = 2, W_U = 2 + 0 = 2 do
    too. With weights 0.5, 2, 0.5, 2: W_D = 1, W_U = 4, so auto gives λD = 1 · 4 / 1 = 4, and a
    λD of 1 is warned about: ratio 1 · 1 / (1 · 4) = 0.25."""
    rows = [{**r, "weight": w} for r, w in zip(ROWS, [0.5, 2.0, 0.5, 2.0])]
    split = _split(write, tokenizer, rows)
    lines = []
    assert desirable_weight(_cfg("auto"), split, lines.append) == 4.0
    assert lines == ["eq. (8) on weighted counts: W_D=1 (2 desirable rows), W_U=4 (2 undesirable rows)",
                     "kto.desirable_weight=auto -> 4.0000 (1.0 desirable, 4.0 undesirable summed row weights)"]
    lines.clear()
    assert desirable_weight(_cfg(1.0), split, lines.append) == 1.0
    assert lines[1].startswith("warning: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = "
                               "1.0 * 1.0 / (1.0 * 4.0) = 0.25, outside [1, 4/3]")


def test_unweighted_eq8_lines_stay_as_they_were(write, tokenizer):
    split = _split(write, tokenizer, [{k: v for k, v in r.items() if k != "weight"} for r in ROWS[:3]])
    lines = []
    assert desirable_weight(_cfg("auto"), split, lines.append) == pytest.approx(0.5)
    assert lines == ["kto.desirable_weight=auto -> 0.5000 (2 desirable, 1 undesirable rows)"]
