"""The sorting demo as conversations: several sort requests in one chat, for the conversation
format (megakto/data/conversations.py) and its end-to-end tests.

A desirable conversation sorts in every assistant turn; its undesirable twin breaks the rule in
one turn (a corruption of :mod:`megakto._demo.data`) and keeps the other turns correct, so a
model can only tell them apart by scoring every assistant turn. With ``turn_labels`` each
assistant turn carries its own label instead of the row (the broken turn false, the others
true): the per-turn examples of the broken turn and of its correct twin share their prompt
(the conversation before the turn), so reward accuracy over them measures whether the model learned
which turn broke the rule.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from megakto._demo import data as sort_data

__all__ = ["make_conversation_rows", "write_conversation_data"]


def _conversation(requests: list[list[int]], broken: int | None, rng: random.Random) -> list[dict]:
    messages = []
    for k, numbers in enumerate(requests):
        answer = sorted(numbers) if k != broken else sort_data._corrupt(numbers, rng.choice(sort_data.CORRUPTIONS), rng)
        messages += [{"role": "user", "content": sort_data.format_prompt(numbers)},
                     {"role": "assistant", "content": sort_data._format_answer(answer)}]
    return messages


def _rows(groups: list[list[list[int]]], rng: random.Random, turn_labels: bool) -> list[dict]:
    rows = []
    for requests in groups:
        broken = rng.randrange(len(requests))
        good, bad = _conversation(requests, None, rng), _conversation(requests, broken, rng)
        if not turn_labels:
            rows += [{"messages": good, "label": True}, {"messages": bad, "label": False}]
            continue
        for messages, wrong in ((good, None), (bad, broken)):
            turns = [m for m in messages if m["role"] == "assistant"]
            for k, m in enumerate(turns):
                m["label"] = k != wrong
            rows.append({"messages": messages})
    return rows


def make_conversation_rows(n_conversations: int, *, turns: int = 2, seed: int = 0,
                           turn_labels: bool = False) -> list[dict]:
    """``n_conversations`` pairs of rows: a conversation of ``turns`` sort requests answered
    correctly, and its twin with one turn broken."""
    rng = random.Random(seed)
    prompts = sort_data._distinct_prompts(n_conversations * turns, rng)
    groups = [prompts[i * turns:(i + 1) * turns] for i in range(n_conversations)]
    return _rows(groups, rng, turn_labels)


def write_conversation_data(out_dir: str | Path, *, n_train: int = 400, n_eval: int = 60, turns: int = 2,
                            seed: int = 0, turn_labels: bool = False) -> tuple[Path, Path]:
    """``train.jsonl`` and ``eval.jsonl`` under ``out_dir``, no sort request in both."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_conversation_rows(n_train + n_eval, turns=turns, seed=seed, turn_labels=turn_labels)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, part in zip(paths, (rows[:2 * n_train], rows[2 * n_train:])):
        with path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return paths
