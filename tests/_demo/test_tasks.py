"""megakto._demo.tasks: the quality benchmark's verifiable tasks, their checkers and wrong answers."""

import random

import pytest

from megakto._demo.tasks import TASKS, get_task, make_examples


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_desirable_passes_and_every_undesirable_fails(name):
    task = get_task(name)
    examples = make_examples(task, 3000, seed=3)
    assert len({e.prompt for e in examples}) == 3000  # distinct prompts
    for e in examples:
        assert task.check(e.prompt, e.desirable), e
        assert e.undesirable != e.desirable and not task.check(e.prompt, e.undesirable), e


def test_hand_checked_answers():
    assert get_task("sort").check("sort: 7 2 9 4 ->", "2 4 7 9")
    assert not get_task("sort").check("sort: 7 2 9 4 ->", "2 4 9 7")
    copy = get_task("copy")
    assert copy.check("copy: 3 3 0 1 8 ->", " 3 3  0 1 8 ")  # whitespace ignored
    assert not copy.check("copy: 3 3 0 1 8 ->", "3 3 0 1")
    assert not copy.check("copy: 3 3 0 1 8 ->", "3 3 0 1 8 x")
    add = get_task("add")
    # Least significant digit first: 394 + 9226 = 9620.
    assert add.check("add: 4 9 3 + 6 2 2 9 =", "0 2 6 9")
    assert not add.check("add: 4 9 3 + 6 2 2 9 =", "0 1 5 9")  # carries forgotten: 0 + 11 + 5 + 9
    assert add.check("add: 3 9 + 8 =", "1 0 1")  # 93 + 8 = 101


def test_the_same_seed_gives_the_same_examples():
    task = get_task("add")
    assert make_examples(task, 50, seed=1) == make_examples(task, 50, seed=1)
    assert make_examples(task, 50, seed=1) != make_examples(task, 50, seed=2)


def test_wrong_answers_are_of_every_kind():
    """copy: changed, dropped and swapped digits all occur; add: the forgotten carry and a digit off."""
    copy, add = get_task("copy"), get_task("add")
    kinds = set()
    for e in make_examples(copy, 300, seed=0):
        good, bad = e.desirable.split(), e.undesirable.split()
        kinds.add("drop" if len(bad) < len(good) else "swap" if sorted(bad) == sorted(good) else "change")
    assert kinds == {"drop", "swap", "change"}
    no_carry = 0
    for e in make_examples(add, 300, seed=0):
        a, b = (x[::-1] for x in e.prompt[5:-2].replace(" ", "").split("+"))
        forgotten = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(a.zfill(5), b.zfill(5))))
        no_carry += e.undesirable.replace(" ", "") == str(forgotten)[::-1]
    assert 60 < no_carry < 200


def test_unknown_task_and_bad_prompts():
    with pytest.raises(ValueError, match="unknown task 'mul'; tasks: sort, copy, add"):
        get_task("mul")
    with pytest.raises(ValueError, match="not a copy prompt"):
        get_task("copy").check("sort: 1 2 ->", "1 2")
    assert not get_task("add").check("add: 1 + 2 =", "three")
    rng = random.Random(0)
    assert get_task("copy").example([5, 5, 5, 5, 5], rng).undesirable != "5 5 5 5 5"  # no swap changes it
