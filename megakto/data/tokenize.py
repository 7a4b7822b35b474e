"""Rows -> token ids, fitted to ``max_length``.

A row becomes ``prompt_ids`` (with the tokenizer's BOS) and ``completion_ids`` (no BOS, EOS
appended). Chat rows are rendered with the tokenizer's chat template: the prompt with the
generation prompt, the completion as the rest of the rendered conversation, so the two id lists
concatenate to what the model sees at inference.

When a row is too long we keep the end of the prompt (the part next to the answer) and the start
of the completion, as TRL's KTO trainer does (``data.overlong: truncate``). A completion cut short
loses its EOS: it no longer ends there, and teaching the model to stop mid-answer would be wrong.
For long reasoning traces the label is usually decided by the end (the final answer), and a cut
trains on the wrong evidence: ``data.overlong: drop`` leaves out every row whose completion would
lose a token (the prompt may still lose its start, down to ``max_prompt_length``), and the report
names each one.

The :class:`TokenizeReport` also says how many completion tokens ``max_length`` cut and whether
the tokenizer kept the text: a tokenizer that transformers builds wrongly from its files loses
words without an error (megakto/data/_token_checks.py has the measures and thresholds).

``prompt_key`` is a 63-bit hash of the prompt text, identical in every process (Python's ``hash``
is salted per process, so it cannot be used). The KL estimate pairs prompt i with completion j
from a different prompt (KTO, Ethayarajh et al. 2024, sec. 3.2); the key is how that pairing tells
prompts apart without shipping text around.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Sequence

import datasets
import numpy as np

from megakto.data import _token_checks as checks
from megakto.data._token_checks import Example, TokenizeReport
from megakto.data.context_ids import scored_tokens
from megakto.data.conversations import conversation_texts
from megakto.data.conversations import examples as conversation_examples
from megakto.errors import ConfigError, DataError, ModelError

__all__ = ["auto_num_proc", "fit_to_length", "fitted_lengths", "prompt_key", "tokenize_rows", "TokenizeReport"]

_FITS, _TRUNCATED, _DROPPED, _OVERLONG = 0, 1, 2, 3
OVERLONG = ("truncate", "drop")
# Per-row facts the report and the tokenizer checks need; removed before the dataset is returned.
_CHECK_COLUMNS = ["_fit", "_c_len", "_c_cut", "_eos_only", "_ids_key", "_text_key", "_src", "_c_scored", "_check_s"]
_MASK63 = (1 << 63) - 1


def fit_to_length(prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int,
                  max_prompt_length: int) -> tuple[list[int], list[int]] | None:
    """Fit a prompt + completion into ``max_length`` tokens; None when no completion token fits.

    The prompt keeps its last ``min(len(p), max(max_length - len(c), max_prompt_length))``
    tokens: it only gives up room the completion needs, and never goes below
    ``max_prompt_length``. The completion then keeps its first ``max_length - kept_prompt``,
    which is at least one token unless ``max_prompt_length >= max_length``.
    """
    p, c = list(prompt_ids), list(completion_ids)
    keep_p, keep_c = fitted_lengths(len(p), len(c), max_length, max_prompt_length)
    if keep_c <= 0:
        return None
    return p[len(p) - keep_p:], c[:keep_c]


def fitted_lengths(n_prompt: int, n_completion: int, max_length: int, max_prompt_length: int) -> tuple[int, int]:
    """(prompt tokens kept, completion tokens kept) by :func:`fit_to_length`; the second is <= 0
    when no completion token fits. Lengths only, for code that slices id arrays itself."""
    if n_prompt + n_completion <= max_length:
        return n_prompt, n_completion
    keep_p = min(n_prompt, max(max_length - n_completion, max_prompt_length))
    return keep_p, max_length - keep_p


ROWS_PER_PROCESS = 50_000
MAX_PROCESSES = 8


def auto_num_proc(n_rows: int, cores: int | None = None) -> int:
    """``data.num_proc: null``: one tokenizing process per 50,000 rows, at most the cores this
    process may run on and at most 8 (a small file is not worth starting workers for). Local rank
    0 tokenizes while the node's other ranks wait, so the node's cores are free."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_PROCESSES, -(-n_rows // ROWS_PER_PROCESS)))


def prompt_key(text: str) -> int:
    """Stable 63-bit key of a prompt text (blake2b; the same in every process and on every run)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _MASK63


def tokenize_rows(ds: datasets.Dataset, tokenizer, *, max_length: int,
                  max_prompt_length: int | None = None, num_proc: int | None = None,
                  overlong: str = "truncate") -> tuple[datasets.Dataset, TokenizeReport]:
    """Tokenize rows from :func:`megakto.data.rows.load_rows` and fit them to ``max_length``.

    Returns the dataset (columns prompt_ids, completion_ids, label, prompt_key, source, row, and
    weight when the rows have one) with
    rows that had no room for a completion token removed (and, with ``overlong="drop"``, every row
    whose completion would be cut), and a :class:`TokenizeReport`.
    Raises :class:`DataError` when most rows lose their text to the tokenizer (see
    :meth:`TokenizeReport.problem`). ``datasets`` caches the map, so a second run over the same
    rows and tokenizer is quick.
    """
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if max_length < 1 or max_prompt_length < 0:
        raise ConfigError(f"max_length={max_length}, max_prompt_length={max_prompt_length}: need "
                          f"max_length >= 1 and max_prompt_length >= 0")
    if overlong not in OVERLONG:
        raise ConfigError(f"data.overlong={overlong!r}; allowed values: {', '.join(OVERLONG)}")
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
        "_c_len": datasets.Value("int32"),
        "_c_cut": datasets.Value("int32"),
        "_eos_only": datasets.Value("bool"),
        "_ids_key": datasets.Value("int64"),
        "_text_key": datasets.Value("int64"),
        "_check_s": datasets.Value("float64"),
        "_src": datasets.Value("int64"),  # the input row an example came from
        "_c_scored": datasets.Value("int32"),  # scored completion tokens (a conversation's assistant tokens)
        **({"weight": datasets.Value("float64")} if "weight" in ds.column_names else {}),
    })
    out = ds.map(
        _tokenize_batch, batched=True, with_indices=True, num_proc=num_proc, features=features,
        remove_columns=ds.column_names, desc="tokenizing",
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                   "max_prompt_length": max_prompt_length, "overlong": overlong,
                   "stride": checks.check_stride(len(ds))})
    cols = out.select_columns(_CHECK_COLUMNS + ["prompt_key", "label"]).with_format("numpy")[:]
    fit = cols["_fit"]
    dropped = np.flatnonzero(fit == _DROPPED)
    dropped_rows = []
    if len(dropped):
        gone = out.select(dropped)
        dropped_rows = list(zip(gone["source"], gone["row"]))
    over = np.flatnonzero(fit == _OVERLONG)
    overlong_rows = []
    if len(over):
        gone = out.select(over)
        overlong_rows = list(zip(gone["source"], gone["row"], cols["_c_len"][over].tolist(),
                                 cols["_c_cut"][over].tolist()))
    cut = cols["_c_cut"][fit == _TRUNCATED]
    report = TokenizeReport(n_rows=len(ds), n_examples=len(out) if len(out) != len(ds) else 0, n_truncated=int((fit == _TRUNCATED).sum()),
                            n_dropped=len(dropped), dropped_rows=dropped_rows,
                            max_length=max_length, max_prompt_length=max_prompt_length,
                            completion_tokens=int(cols["_c_len"].sum()),
                            completion_tokens_cut=int(cols["_c_cut"][fit != _OVERLONG].sum()),
                            n_completions_cut=int((cut > 0).sum()), max_completion_cut=int(cut.max(initial=0)),
                            kept_tokens_cut=int(cut.sum()),
                            overlong=overlong, n_overlong=len(over), overlong_rows=overlong_rows,
                            tokenizer=_name(tokenizer))
    checks.count_formats(report, ds, cols["_src"], cols["_c_scored"], (fit != _DROPPED) & (fit != _OVERLONG))
    _check_tokenizer(report, ds, cols, tokenizer)
    problem = report.problem()
    if problem:
        raise DataError(problem)
    if len(dropped) == len(out):
        sources = ", ".join(dict.fromkeys(src for src, _ in dropped_rows))
        raise DataError(f"{sources}: all {len(out)} rows dropped: prompt plus completion leaves no "
                        f"room for a completion token within max_length={max_length} "
                        f"(max_prompt_length={max_prompt_length})")
    if len(dropped) + len(over) == len(out):
        sources = ", ".join(dict.fromkeys(src for src, *_ in overlong_rows + dropped_rows))
        raise DataError(f"{sources}: all {len(out)} rows dropped: data.overlong=drop and no completion fits "
                        f"whole within max_length={max_length} (max_prompt_length={max_prompt_length}); "
                        f"raise data.max_length or set data.overlong=truncate")
    if len(dropped) or len(over):
        out = out.filter(lambda f: [x not in (_DROPPED, _OVERLONG) for x in f], input_columns="_fit",
                         batched=True, desc="dropping rows that do not fit")
    return out.remove_columns(_CHECK_COLUMNS), report


def _check_tokenizer(report: TokenizeReport, ds: datasets.Dataset, cols, tokenizer) -> None:
    """Fill in the report's tokenizer checks (megakto/data/_token_checks.py), their examples and
    their time (the per-row part measured in the map, ``_check_s``)."""
    start = time.perf_counter()
    stride = checks.check_stride(len(ds))
    rows = np.flatnonzero(cols["prompt_key"] % stride == 0)  # the checked examples
    report.n_checked = len(rows) if stride > 1 else 0  # 0: every row
    eos_only = rows[cols["_eos_only"][rows]]
    report.n_eos_only = len(eos_only)
    if len(eos_only):
        report.examples["eos_only"] = _example(tokenizer, ds, int(cols["_src"][eos_only[0]]), "completion")
    identical, report.n_paired = checks.identical_pairs(
        *(cols[k][rows] for k in ("prompt_key", "label", "_ids_key", "_text_key")))
    report.n_identical = int(identical.sum())
    if report.n_identical:
        report.examples["identical"] = _example(tokenizer, ds, int(cols["_src"][rows[np.argmax(identical)]]),
                                                "completion")

    sample = checks.sample_indices(len(ds))
    texts, where = [], []
    for i, row in zip(sample, ds.select(sample)):
        texts.extend(_texts(tokenizer, row))
        where.extend([(i, "prompt"), (i, "completion")])
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    worst, worst_share = None, 0.0
    for k, (text, back) in enumerate(zip(texts, decoded)):
        n, lost = checks.chars_lost(text, back)
        report.chars_decoded += n
        report.chars_lost += lost
        if n and lost / n > worst_share:
            worst, worst_share = k, lost / n
    report.n_decoded = len(sample)
    if worst is not None:
        report.examples["decode"] = _example(tokenizer, ds, *where[worst])
    report.check_seconds = float(cols["_check_s"].sum()) + time.perf_counter() - start


def _texts(tokenizer, row) -> tuple[str, str]:
    """(prompt text, completion text) of one row as the tokenizer sees them."""
    if row.get("conversation"):
        return conversation_texts(tokenizer, row["conversation"], row["source"], row["row"])
    if isinstance(row["prompt"], str):
        return row["prompt"], row["completion"]
    return _render_chat(tokenizer, row["prompt"], row["completion"], row["source"], row["row"])


def _example(tokenizer, ds: datasets.Dataset, i: int, field: str) -> Example:
    row = ds[i]
    text = _texts(tokenizer, row)[field == "completion"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if field == "completion" and not (ids and ids[-1] == tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]  # as _tokenize_batch ends every completion
    return Example(row["source"], row["row"], field, checks.show_text(text),
                   checks.show_tokens(tokenizer, ids))


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


def _tokenize_batch(batch, indices=None, *, tokenizer, max_length, max_prompt_length, overlong="truncate",
                    stride=1):
    n = len(batch["label"])
    conversations = batch.get("conversation") or [None] * n
    plain = [i for i in range(n) if conversations[i] is None]
    prompt_texts, completion_texts = [], []
    for i in plain:
        p, c, src, row = batch["prompt"][i], batch["completion"][i], batch["source"][i], batch["row"][i]
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
    completion_ids = tokenizer(completion_texts, add_special_tokens=False)["input_ids"] if plain else []
    # A template that already closes the turn with EOS gets no second one.
    completion_ids = [c if c and c[-1] == eos else c + [eos] for c in completion_ids]

    # Every input row gives one example, a conversation with turn labels one per labelled turn.
    made = dict(zip(plain, zip(prompt_texts, prompt_ids, completion_ids, completion_texts,
                               [batch["label"][i] for i in plain])))
    at = []  # input row (position in the batch) of each example
    examples = []
    for i in range(n):
        if i in made:
            at.append(i)
            examples.append(made[i])
        else:
            for ex in conversation_examples(tokenizer, conversations[i], batch["label"][i], batch["source"][i],
                                            batch["row"][i]):
                at.append(i)
                examples.append(ex)
    prompt_texts = [e[0] for e in examples]
    prompt_ids = [e[1] for e in examples]
    completion_ids = [e[2] for e in examples]
    completion_texts = [e[3] for e in examples]

    out = {"prompt_ids": [], "completion_ids": [], "_fit": [], "_c_cut": []}
    for p, c in zip(prompt_ids, completion_ids):
        fitted = fit_to_length(p, c, max_length, max_prompt_length)
        if fitted is None:
            out["prompt_ids"].append([])
            out["completion_ids"].append([])
            out["_fit"].append(_DROPPED)
            out["_c_cut"].append(len(c))
        elif overlong == "drop" and len(fitted[1]) < len(c):
            out["prompt_ids"].append([])
            out["completion_ids"].append([])
            out["_fit"].append(_OVERLONG)
            out["_c_cut"].append(len(c) - len(fitted[1]))  # what truncating would have cut
        else:
            out["prompt_ids"].append(fitted[0])
            out["completion_ids"].append(fitted[1])
            out["_fit"].append(_TRUNCATED if len(p) + len(c) > max_length else _FITS)
            out["_c_cut"].append(len(c) - len(fitted[1]))
    out["_c_len"] = [len(c) for c in completion_ids]
    out["_c_scored"] = [scored_tokens(c) for c in out["completion_ids"]]
    out["prompt_key"] = [prompt_key(t) for t in prompt_texts]
    start = time.perf_counter()  # the tokenizer checks' per-row facts, for the rows they read
    checked = [k % stride == 0 for k in out["prompt_key"]]
    out["_eos_only"] = [on and bool(t.strip()) and all(x == eos for x in c)
                        for on, t, c in zip(checked, completion_texts, completion_ids)]
    out["_ids_key"] = [checks.ids_fingerprint(c) if on else 0 for on, c in zip(checked, completion_ids)]
    out["_text_key"] = [checks.text_fingerprint(t) if on else 0 for on, t in zip(checked, completion_texts)]
    out["_check_s"] = [time.perf_counter() - start] + [0.0] * (len(checked) - 1) if checked else []
    out["label"] = [bool(e[4]) for e in examples]
    out["source"] = [batch["source"][i] for i in at]
    out["row"] = [batch["row"][i] for i in at]
    out["_src"] = [indices[i] if indices is not None else i for i in at]
    if "weight" in batch:
        out["weight"] = [batch["weight"][i] for i in at]
    return out
