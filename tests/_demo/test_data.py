"""The demo task: every label is checkable, prompts are distinct and split cleanly, and the output
is a pure function of the seed."""

import json

import pytest

from megakto._demo.data import (
    CORRUPTIONS,
    demo_corpus,
    format_prompt,
    is_desirable,
    make_demo_rows,
    parse_prompt,
    write_demo_data,
)


def _numbers(text):
    return [int(w) for w in text.split()]


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("2 4 7 9", True),
        ("  2 4  7 9 ", True),  # whitespace is not part of the answer
        ("2 4 9 7", False),  # one adjacent swap
        ("9 7 4 2", False),  # reversed
        ("2 4 7", False),  # a number missing
        ("2 4 7 9 9", False),  # a number extra
        ("2, 4, 7, 9", False),  # not space-separated integers
        ("", False),
    ],
)
def test_checker_by_hand(completion, ok):
    assert is_desirable("sort: 7 2 9 4 ->", completion) is ok


def test_prompt_format_round_trips_and_bad_prompts_raise():
    assert format_prompt([7, 2, 9, 4]) == "sort: 7 2 9 4 ->"
    assert parse_prompt("sort: 7 2 9 4 ->") == [7, 2, 9, 4]
    for bad in ["7 2 9 4", "sort: 7 2 9 4", "sort: a b ->", "sort: ->"]:
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_rows_pair_one_desirable_with_one_undesirable_per_prompt():
    rows = make_demo_rows(300, seed=0)
    assert len(rows) == 600
    assert all(is_desirable(r["prompt"], r["completion"]) is r["label"] for r in rows)
    goods, bads = rows[0::2], rows[1::2]
    assert all(g["label"] and not b["label"] and g["prompt"] == b["prompt"] for g, b in zip(goods, bads))
    assert len({g["prompt"] for g in goods}) == 300
    for g, b in zip(goods, bads):
        numbers = parse_prompt(g["prompt"])
        assert 4 <= len(numbers) <= 6 and len(set(numbers)) == len(numbers)
        # Only the order is wrong: no length or digit shortcut separates the two labels.
        assert sorted(_numbers(b["completion"])) == sorted(numbers) == _numbers(g["completion"])


def test_all_corruptions_occur():
    kinds = set()
    for r in make_demo_rows(200, seed=1)[1::2]:
        got, want = _numbers(r["completion"]), sorted(parse_prompt(r["prompt"]))
        wrong = [i for i in range(len(got)) if got[i] != want[i]]
        if got == want[::-1]:
            kinds.add("reverse")
        elif len(wrong) == 2 and wrong[1] == wrong[0] + 1:
            kinds.add("swap")
        else:
            kinds.add("shuffle")
    assert kinds == set(CORRUPTIONS)


def test_unpaired_rows_have_one_row_per_prompt():
    rows = make_demo_rows(400, seed=0, both_labels=False)
    assert len(rows) == 400 and len({r["prompt"] for r in rows}) == 400
    assert all(is_desirable(r["prompt"], r["completion"]) is r["label"] for r in rows)
    n_good = sum(r["label"] for r in rows)
    assert 150 < n_good < 250  # a fair coin: mean 200, sd 10


def test_rows_are_a_function_of_the_seed():
    assert make_demo_rows(50, seed=3) == make_demo_rows(50, seed=3)
    assert make_demo_rows(50, seed=3) != make_demo_rows(50, seed=4)
    assert make_demo_rows(0, seed=0) == []


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_written_files_are_exact_disjoint_and_deterministic(tmp_path):
    train_path, eval_path = write_demo_data(tmp_path / "a", n_train_prompts=120, n_eval_prompts=30, seed=7)
    assert (train_path.name, eval_path.name) == ("train.jsonl", "eval.jsonl")
    train, evaluation = _read(train_path), _read(eval_path)
    assert (len(train), len(evaluation)) == (240, 60)
    assert all(set(r) == {"prompt", "completion", "label"} for r in train + evaluation)
    assert all(is_desirable(r["prompt"], r["completion"]) is r["label"] for r in train + evaluation)
    train_prompts, eval_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in evaluation}
    assert (len(train_prompts), len(eval_prompts)) == (120, 30)
    assert not train_prompts & eval_prompts
    again = write_demo_data(tmp_path / "b", n_train_prompts=120, n_eval_prompts=30, seed=7)
    assert again[0].read_bytes() == train_path.read_bytes()
    assert again[1].read_bytes() == eval_path.read_bytes()


def test_unpaired_train_file_keeps_paired_eval(tmp_path):
    train_path, eval_path = write_demo_data(tmp_path, n_train_prompts=80, n_eval_prompts=20, both_labels=False)
    train, evaluation = _read(train_path), _read(eval_path)
    assert (len(train), len(evaluation)) == (80, 40)
    assert sum(r["label"] for r in evaluation) == 20


def test_corpus_covers_the_demo_text():
    lines = demo_corpus(10, seed=0)
    rows = make_demo_rows(10, seed=0)
    assert all(isinstance(line, str) for line in lines)
    assert {r["prompt"] for r in rows} <= set(lines) and {r["completion"] for r in rows} <= set(lines)
