"""Verifiable tasks for the quality benchmark (tools/quality_bench.py): a program checks every answer.

Each task makes prompts with one correct completion (desirable) and one wrong one (undesirable), and
:meth:`Task.check` says whether any completion, e.g. a greedy generation, is correct. Three kinds:

* ``sort``: the quickstart's digits in ascending order (:mod:`megakto._demo.data`); an ordering.
* ``copy``: repeat 5-8 digits (repeats allowed) exactly; wrong = one digit changed, dropped or
  two neighbours swapped. Position-by-position copying, the signal of an induction head.
* ``add``: a 2-4 digit number plus a digit, every number written least significant digit first
  (``add: 3 9 + 8 =`` is 93 + 8, answer ``1 0 1``); wrong = the carries forgotten, or one digit off
  by one. Arithmetic with carries, in the order a left-to-right model can carry.

Every text is digits, spaces and a short tag, so the tiny model's tokenizer (digits split) writes
prompts of 12-23 tokens and answers of 4-16. Every wrong completion differs from the right one, and the
checker rejects it (tests/_demo/test_tasks.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from megakto._demo import data as sort_data

__all__ = ["Example", "Task", "TASKS", "get_task", "make_examples"]


@dataclass(frozen=True)
class Example:
    prompt: str
    desirable: str
    undesirable: str


@dataclass(frozen=True)
class Task:
    name: str
    _draw: Callable[[random.Random], list[int] | tuple[int, int]]  # a prompt's content
    _prompt: Callable[[object], str]
    _answer: Callable[[object], list[int]]
    _corrupt: Callable[[object, random.Random], list[int]]
    _parse: Callable[[str], object]

    def example(self, content, rng: random.Random) -> Example:
        return Example(self._prompt(content), _spaced(self._answer(content)), _spaced(self._corrupt(content, rng)))

    def check(self, prompt: str, completion: str) -> bool:
        """True iff ``completion`` is the correct answer (space-separated digits; whitespace around
        and between them ignored; anything else is wrong)."""
        try:
            got = [int(w) for w in completion.split()]
        except ValueError:
            return False
        return got == self._answer(self._parse(prompt))


def _spaced(digits: list[int]) -> str:
    return " ".join(map(str, digits))


def _words(prompt: str, tag: str, end: str) -> list[str]:
    words = prompt.split()
    if len(words) < 3 or words[0] != tag or words[-1] != end:
        raise ValueError(f"not a {tag[:-1]} prompt: {prompt!r}")
    return words[1:-1]


# sort -------------------------------------------------------------------------------------------

def _sort_corrupt(numbers, rng):
    return sort_data._corrupt(list(numbers), rng.choice(sort_data.CORRUPTIONS), rng)


SORT = Task("sort", lambda rng: rng.sample(range(10), rng.randint(4, 6)), sort_data.format_prompt,
            sorted, _sort_corrupt, sort_data.parse_prompt)


# copy -------------------------------------------------------------------------------------------

def _copy_corrupt(digits, rng):
    out = list(digits)
    kind = rng.choice(("change", "drop", "swap"))
    i = rng.randrange(len(out))
    if kind == "drop":
        del out[i]
    elif kind == "swap" and len(set(out)) > 1:
        while True:  # a pair of different neighbours, so the swap changes the answer
            i = rng.randrange(len(out) - 1)
            if out[i] != out[i + 1]:
                break
        out[i], out[i + 1] = out[i + 1], out[i]
    else:
        out[i] = rng.choice([d for d in range(10) if d != out[i]])
    return out


COPY = Task("copy", lambda rng: [rng.randrange(10) for _ in range(rng.randint(5, 8))],
            lambda d: " ".join(["copy:", *map(str, d), "->"]), list, _copy_corrupt,
            lambda p: [int(w) for w in _words(p, "copy:", "->")])


# add --------------------------------------------------------------------------------------------

def _digits(n: int) -> list[int]:
    """Least significant digit first, so that each answer digit follows from the operand digits
    at its own position and the carry of the digit just written."""
    return [int(c) for c in reversed(str(n))]


def _add_draw(rng):
    return rng.randint(10, 10 ** rng.randint(2, 4) - 1), rng.randint(1, 9)


def _add_prompt(ab):
    a, b = ab
    return " ".join(["add:", *map(str, _digits(a)), "+", *map(str, _digits(b)), "="])


def _add_parse(prompt):
    words = _words(prompt, "add:", "=")
    if words.count("+") != 1:
        raise ValueError(f"not an add prompt: {prompt!r}")
    i = words.index("+")
    return int("".join(reversed(words[:i]))), int("".join(reversed(words[i + 1:])))


def _add_answer(ab):
    return _digits(ab[0] + ab[1])


def _add_corrupt(ab, rng):
    a, b = ab
    right = _add_answer(ab)
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(str(a).zfill(5), str(b).zfill(5))))
    if _digits(no_carry) != right and rng.random() < 0.5:
        return _digits(no_carry)
    out = list(right)
    i = rng.randrange(len(out))
    out[i] = (out[i] + rng.choice((1, -1))) % 10
    top = len(out) - 1
    if i == top and out[top] == 0 and top:  # no leading zero: a wrong number, not a wrong format
        out[top] = right[top] % 9 + 1 if right[top] != 9 else 8
    return out


ADD = Task("add", _add_draw, _add_prompt, _add_answer, _add_corrupt, _add_parse)

TASKS = {t.name: t for t in (SORT, COPY, ADD)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def make_examples(task: Task, n: int, *, seed: int) -> list[Example]:
    """``n`` examples with distinct prompts, the same for the same seed."""
    rng = random.Random(seed)
    seen, out = set(), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"task {task.name}: fewer than {n} distinct prompts")
        content = task._draw(rng)
        key = tuple(content)
        if key in seen:
            continue
        seen.add(key)
        out.append(task.example(content, rng))
    return out
