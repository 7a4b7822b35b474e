"""The quickstart task: sort a few digits.

A prompt ``"sort: 7 2 9 4 ->"`` has one correct completion, ``"2 4 7 9"`` (desirable), and many
wrong ones: the same digits in another order (undesirable). Every label can be checked with
:func:`is_desirable`, so a run on this data can be judged without a reward model or a human.

Why this task: it needs no download, it is plain text, and the signal is local (each digit of a
sorted answer is the smallest one not yet written), which a randomly initialised 2-layer model picks
up within a few hundred KTO steps on CPU. The binary desirable/undesirable labels are exactly the
feedback KTO is built for (Ethayarajh et al. 2024, sec. 3): no pairs are required, but the demo
still gives every prompt one completion of each kind so that held-out *reward accuracy* (does the
desirable completion get the higher implicit reward?) can be measured per prompt.

Undesirable completions are drawn from three corruptions, so a model cannot win by spotting a single
pattern: a random non-sorted shuffle, the reversed order, and one adjacent swap (the hardest case:
only one step of the sequence goes down).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = [
    "PROMPT_PREFIX",
    "PROMPT_SUFFIX",
    "CORRUPTIONS",
    "format_prompt",
    "parse_prompt",
    "is_desirable",
    "make_demo_rows",
    "write_demo_data",
    "demo_corpus",
]

PROMPT_PREFIX = "sort:"
# The arrow marks where the answer starts; without it the digits of prompt and answer look alike
# and the model must count to find the boundary, which makes the task needlessly slower to learn.
PROMPT_SUFFIX = "->"
CORRUPTIONS = ("shuffle", "reverse", "swap")

_DIGITS = tuple(range(10))
_MIN_LEN, _MAX_LEN = 4, 6


def format_prompt(numbers: list[int]) -> str:
    return " ".join([PROMPT_PREFIX, *map(str, numbers), PROMPT_SUFFIX])


def _format_answer(numbers: list[int]) -> str:
    return " ".join(map(str, numbers))


def parse_prompt(prompt: str) -> list[int]:
    """The numbers of a demo prompt; ``ValueError`` if ``prompt`` is not in the demo format."""
    words = prompt.split()
    if len(words) < 3 or words[0] != PROMPT_PREFIX or words[-1] != PROMPT_SUFFIX:
        raise ValueError(f"not a demo prompt (want '{PROMPT_PREFIX} 3 1 2 {PROMPT_SUFFIX}'): {prompt!r}")
    try:
        return [int(w) for w in words[1:-1]]
    except ValueError:
        raise ValueError(f"not a demo prompt (numbers must be integers): {prompt!r}") from None


def is_desirable(prompt: str, completion: str) -> bool:
    """True iff ``completion`` lists the prompt's numbers in ascending order, space-separated.

    Whitespace around and between the numbers is ignored; anything that is not an integer makes the
    completion undesirable.
    """
    numbers = parse_prompt(prompt)
    try:
        answer = [int(w) for w in completion.split()]
    except ValueError:
        return False
    return answer == sorted(numbers)


def _corrupt(numbers: list[int], kind: str, rng: random.Random) -> list[int]:
    """The prompt's numbers in a non-ascending order. ``numbers`` are distinct, so any order other
    than the sorted one is wrong."""
    target = sorted(numbers)
    if kind == "reverse":
        return target[::-1]
    if kind == "swap":
        i = rng.randrange(len(target) - 1)
        out = list(target)
        out[i], out[i + 1] = out[i + 1], out[i]
        return out
    out = list(target)
    while out == target:
        rng.shuffle(out)
    return out


def _distinct_prompts(n: int, rng: random.Random) -> list[list[int]]:
    seen: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    while len(out) < n:
        numbers = rng.sample(_DIGITS, rng.randint(_MIN_LEN, _MAX_LEN))
        if tuple(numbers) not in seen:
            seen.add(tuple(numbers))
            out.append(numbers)
    return out


def _rows_for(prompts: list[list[int]], rng: random.Random, both_labels: bool) -> list[dict]:
    rows = []
    for numbers in prompts:
        prompt = format_prompt(numbers)
        good = {"prompt": prompt, "completion": _format_answer(sorted(numbers)), "label": True}
        bad = {
            "prompt": prompt,
            "completion": _format_answer(_corrupt(numbers, rng.choice(CORRUPTIONS), rng)),
            "label": False,
        }
        if both_labels:
            rows += [good, bad]
        else:
            rows.append(good if rng.random() < 0.5 else bad)
    return rows


def make_demo_rows(n_prompts: int, *, seed: int, both_labels: bool = True) -> list[dict]:
    """``n_prompts`` distinct prompts as rows ``{prompt, completion, label}``.

    With ``both_labels`` every prompt gets a desirable row followed by an undesirable one
    (``2 * n_prompts`` rows); otherwise each prompt gets one row whose label is a fair coin flip,
    which is the unpaired feedback KTO is designed for.
    """
    if n_prompts < 0:
        raise ValueError(f"n_prompts must be >= 0, got {n_prompts}")
    rng = random.Random(seed)
    return _rows_for(_distinct_prompts(n_prompts, rng), rng, both_labels)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_demo_data(
    out_dir: str | Path,
    *,
    n_train_prompts: int = 2000,
    n_eval_prompts: int = 200,
    seed: int = 0,
    both_labels: bool = True,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; no prompt appears in both.

    The eval file always has both labels per prompt, because reward accuracy is measured per prompt.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # One draw of distinct prompts, then a split: disjoint by construction.
    prompts = _distinct_prompts(n_train_prompts + n_eval_prompts, rng)
    train = _rows_for(prompts[:n_train_prompts], rng, both_labels)
    evaluation = _rows_for(prompts[n_train_prompts:], rng, True)
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(eval_path, evaluation)
    return train_path, eval_path


def demo_corpus(n_prompts: int = 2000, *, seed: int = 0) -> list[str]:
    """Lines to train the tiny model's tokenizer on: demo prompts and answers plus a little general
    English, so that ordinary text also gets multi-character pieces instead of single bytes."""
    lines = []
    for row in make_demo_rows(n_prompts, seed=seed):
        lines += [row["prompt"], row["completion"], f"{row['prompt']} {row['completion']}"]
    return lines + list(_GENERAL_TEXT)


_GENERAL_TEXT = (
    "Sort the numbers in ascending order.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "You are a helpful assistant. Answer the question briefly.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea and the wind.",
    "The model learns which completions are desirable and which are not.",
    "A good answer is short, correct and polite; a bad answer is wrong or rude.",
    "Numbers like 12, 345 and 6789 are written one digit at a time.",
    "Training with human feedback makes the assistant more useful for people.",
    "<|system|>", "<|user|>", "<|assistant|>", "system", "user", "assistant",
)
