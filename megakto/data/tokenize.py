"""Rows -> token ids, fitted to ``max_length``.

A row becomes ``prompt_ids`` (with the tokenizer's BOS) and ``completion_ids`` (no BOS, EOS
appended). Chat rows are rendered with the tokenizer's chat template: the prompt with the
generation prompt, the completion as the rest of the rendered conversation, so the two id lists
concatenate to what the model sees at inference.

When a row is too long we keep the end of the prompt (the part next to the answer) and the start
of the completion, as TRL's KTO trainer does. A completion cut short loses its EOS: it no longer
ends there, and teaching the model to stop mid-answer would be wrong.

``prompt_key`` is a 63-bit hash of the prompt text, identical in every process (Python's ``hash``
is salted per process, so it cannot be used). The KL estimate pairs prompt i with completion j
from a different prompt (KTO, Ethayarajh et al. 2024, sec. 3.2); the key is how that pairing tells
prompts apart without shipping text around.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import datasets
import numpy as np

from megakto.errors import ConfigError, DataError, ModelError

__all__ = ["fit_to_length", "prompt_key", "tokenize_rows", "TokenizeReport"]

_FITS, _TRUNCATED, _DROPPED = 0, 1, 2
_MASK63 = (1 << 63) - 1


@dataclass
class TokenizeReport:
    """What tokenizing did to the rows: how many were shortened, which were dropped."""

    n_rows: int
    n_truncated: int
    n_dropped: int
    dropped_rows: list[tuple[str, int]] = field(default_factory=list)
    max_length: int = 0
    max_prompt_length: int = 0

    def summary(self) -> str:
        text = (f"tokenized {self.n_rows} rows (max_length={self.max_length}, "
                f"max_prompt_length={self.max_prompt_length}): {self.n_truncated} truncated, "
                f"{self.n_dropped} dropped")
        if self.dropped_rows:
            src, row = self.dropped_rows[0]
            text += f" (no room for a completion token; first: {src} row {row})"
        return text


def fit_to_length(prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int,
                  max_prompt_length: int) -> tuple[list[int], list[int]] | None:
    """Fit a prompt + completion into ``max_length`` tokens; None when no completion token fits.

    The prompt keeps its last ``min(len(p), max(max_length - len(c), max_prompt_length))``
    tokens: it only gives up room the completion needs, and never goes below
    ``max_prompt_length``. The completion then keeps its first ``max_length - kept_prompt``,
    which is at least one token unless ``max_prompt_length >= max_length``.
    """
    p, c = list(prompt_ids), list(completion_ids)
    if len(p) + len(c) <= max_length:
        return p, c
    keep_p = min(len(p), max(max_length - len(c), max_prompt_length))
    keep_c = max_length - keep_p
    if keep_c <= 0:
        return None
    return p[len(p) - keep_p:], c[:keep_c]


def prompt_key(text: str) -> int:
    """Stable 63-bit key of a prompt text (blake2b; the same in every process and on every run)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _MASK63


def tokenize_rows(ds: datasets.Dataset, tokenizer, *, max_length: int,
                  max_prompt_length: int | None = None, num_proc: int | None = None
                  ) -> tuple[datasets.Dataset, TokenizeReport]:
    """Tokenize rows from :func:`megakto.data.rows.load_rows` and fit them to ``max_length``.

    Returns the dataset (columns prompt_ids, completion_ids, label, prompt_key, source, row) with
    rows that had no room for a completion token removed, and a :class:`TokenizeReport`.
    ``datasets`` caches the map, so a second run over the same rows and tokenizer is quick.
    """
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if max_length < 1 or max_prompt_length < 0:
        raise ConfigError(f"max_length={max_length}, max_prompt_length={max_prompt_length}: need "
                          f"max_length >= 1 and max_prompt_length >= 0")
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer {_name(tokenizer)} has no eos_token; a KTO completion must "
                         f"end with one")
    if len(ds) == 0:
        raise DataError("no rows to tokenize")
    features = datasets.Features({
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "completion_ids": datasets.List(datasets.Value("int32")),
        "label": datasets.Value("bool"),
        "prompt_key": datasets.Value("int64"),
        "source": datasets.Value("string"),
        "row": datasets.Value("int64"),
        "_fit": datasets.Value("int8"),
    })
    out = ds.map(
        _tokenize_batch, batched=True, num_proc=num_proc, features=features,
        remove_columns=ds.column_names, desc="tokenizing",
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                   "max_prompt_length": max_prompt_length})
    fit = np.asarray(out.with_format("numpy")["_fit"])
    dropped = np.flatnonzero(fit == _DROPPED)
    dropped_rows = []
    if len(dropped):
        gone = out.select(dropped)
        dropped_rows = list(zip(gone["source"], gone["row"]))
    report = TokenizeReport(n_rows=len(ds), n_truncated=int((fit == _TRUNCATED).sum()),
                            n_dropped=len(dropped), dropped_rows=dropped_rows,
                            max_length=max_length, max_prompt_length=max_prompt_length)
    if len(dropped) == len(out):
        sources = ", ".join(dict.fromkeys(src for src, _ in dropped_rows))
        raise DataError(f"{sources}: all {len(out)} rows dropped: prompt plus completion leaves no "
                        f"room for a completion token within max_length={max_length} "
                        f"(max_prompt_length={max_prompt_length})")
    if len(dropped):
        out = out.filter(lambda f: [x != _DROPPED for x in f], input_columns="_fit",
                         batched=True, desc="dropping rows that do not fit")
    return out.remove_columns("_fit"), report


def _name(tokenizer) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or '<in memory>'})"


def _render_chat(tokenizer, prompt, completion, source, row) -> tuple[str, str]:
    """Chat rows -> (prompt text, completion text) via the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"tokenizer {_name(tokenizer)} has no chat_template, but {source} row "
                         f"{row} is a list of messages")
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(f"{source}: row {row}: field 'completion': the chat template's rendering of "
                        f"prompt + completion does not start with its rendering of the prompt, so "
                        f"the completion cannot be split off")
    return prompt_text, full_text[len(prompt_text):]


def _tokenize_batch(batch, *, tokenizer, max_length, max_prompt_length):
    prompt_texts, completion_texts = [], []
    for p, c, src, row in zip(batch["prompt"], batch["completion"], batch["source"], batch["row"]):
        if isinstance(p, str):
            prompt_texts.append(p)
            completion_texts.append(c)
        else:
            pt, ct = _render_chat(tokenizer, p, c, src, row)
            prompt_texts.append(pt)
            completion_texts.append(ct)

    # BOS comes from the tokenizer's special tokens, unless the text (typically a chat template
    # that writes {{ bos_token }}) already starts with it: one BOS, never two.
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and t.startswith(bos) for t in prompt_texts]
    prompt_ids = [None] * len(prompt_texts)
    for flag in (False, True):
        idx = [i for i, b in enumerate(has_bos) if b == flag]
        if idx:
            ids = tokenizer([prompt_texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
            for i, x in zip(idx, ids):
                prompt_ids[i] = x

    eos = tokenizer.eos_token_id
    completion_ids = tokenizer(completion_texts, add_special_tokens=False)["input_ids"]
    # A template that already closes the turn with EOS gets no second one.
    completion_ids = [c if c and c[-1] == eos else c + [eos] for c in completion_ids]

    out = {"prompt_ids": [], "completion_ids": [], "_fit": []}
    for p, c in zip(prompt_ids, completion_ids):
        fitted = fit_to_length(p, c, max_length, max_prompt_length)
        if fitted is None:
            out["prompt_ids"].append([])
            out["completion_ids"].append([])
            out["_fit"].append(_DROPPED)
        else:
            out["prompt_ids"].append(fitted[0])
            out["completion_ids"].append(fitted[1])
            out["_fit"].append(_TRUNCATED if len(p) + len(c) > max_length else _FITS)
    out["label"] = list(batch["label"])
    out["prompt_key"] = [prompt_key(t) for t in prompt_texts]
    out["source"] = list(batch["source"])
    out["row"] = list(batch["row"])
    return out
