"""The tokenize report, and whether the tokenizer kept the text: checks run once at start-up.

A tokenizer that does not match its files loses text without any error: transformers may build a
model-specific tokenizer class around a ``tokenizer.json`` written for another model (a word-level
vocabulary read as byte-level BPE with no merges keeps only digits and punctuation), so every
completion becomes the EOS alone, desirable and undesirable completions of a prompt become the
same ids, and KTO trains on nothing at loss 0.5 and KL 0. Three measures catch it:

* **EOS-only completions**: rows whose completion text is not blank but whose ids are only EOS.
* **Token-identical pairs**: rows with a row of the opposite label for the same prompt whose
  completion has the same ids although its text differs (after NFKC and whitespace folding).
  The denominator is the rows whose prompt has both labels ("paired" rows).
* **Characters lost in a decode**: for ``DECODE_SAMPLE`` rows spread evenly over the data, prompt
  and completion are tokenized and decoded again; characters of the original (NFKC, whitespace
  removed) missing from the decode, counted as a multiset so order and spacing do not matter,
  over the characters of the original. Byte-fallback SentencePiece and byte-level BPE lose none.

The first two run on every row up to ``CHECK_ROWS`` rows; past that on a deterministic sample of
whole prompts (:func:`check_stride`: the rows whose prompt key is 0 modulo ``ceil(rows /
CHECK_ROWS)``, about ``CHECK_ROWS`` rows, every label of a sampled prompt kept, so pairs stay whole),
the same rows on every run and rank. Their cost per checked row (fingerprints of each completion's
ids and text) is ~6 us on the 2-core CPU of the tests: over every row of a million, ~6 s plus ~1.7 s
to group the pairs; bounded, 1.2 s there (measured; mostly telling sampled rows from the others).
The decode check reads ``DECODE_SAMPLE`` rows whatever the size.

Each is reported with the data summary. Above ``WARN_SHARE`` (1%) of its rows, paired rows or
characters a warning names an example row; above ``FAIL_SHARE`` (half) the run stops. Completion
tokens cut by ``data.max_length`` are warned about above ``TRUNCATION_WARN_SHARE`` (10%).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["TokenizeReport", "Example", "WARN_SHARE", "FAIL_SHARE", "TRUNCATION_WARN_SHARE",
           "DECODE_SAMPLE", "CHECK_ROWS", "check_stride", "ids_fingerprint", "text_fingerprint", "identical_pairs",
           "sample_indices", "chars_lost", "show_tokens", "show_text", "count_formats"]
WARN_SHARE = 0.01
FAIL_SHARE = 0.5
TRUNCATION_WARN_SHARE = 0.10
DECODE_SAMPLE = 256
CHECK_ROWS = 20_000  # rows the EOS-only and token-identical checks read at most (about: whole prompts)

_MASK63 = (1 << 63) - 1


class Example(NamedTuple):
    """One row a check found, as the warning or error shows it."""

    source: str
    row: int
    field: str
    text: str    # the text as JSON, cut short
    tokens: str  # its tokens as a JSON list, cut short

    def __str__(self) -> str:
        return f"{self.source} row {self.row}: {self.field} {self.text} -> {self.tokens}"


@dataclass
class TokenizeReport:
    """What tokenizing did to the rows: how many were shortened, which were dropped, how many
    completion tokens ``max_length`` cut, and whether the tokenizer kept the text (the module
    docstring gives the measures and their thresholds)."""

    n_rows: int
    n_truncated: int
    n_dropped: int
    dropped_rows: list[tuple[str, int]] = field(default_factory=list)
    max_length: int = 0
    max_prompt_length: int = 0
    completion_tokens: int = 0      # before fitting, EOS included
    completion_tokens_cut: int = 0  # by max_length; a dropped row loses all of its
    n_eos_only: int = 0             # completions with text whose ids are only EOS
    n_paired: int = 0               # rows whose prompt has both labels
    n_identical: int = 0            # ... whose opposite-label completion has the same ids
    n_decoded: int = 0              # rows in the decode sample
    chars_decoded: int = 0
    chars_lost: int = 0
    tokenizer: str = ""
    examples: dict[str, Example] = field(default_factory=dict)
    n_examples: int = 0             # examples, when not one per row (turn labels give one a turn)
    # input rows per format ("text", "chat", "conversation"); kept conversation examples and
    # their assistant (scored) tokens; descriptive, so left out of report equality
    formats: dict[str, int] = field(default_factory=dict, compare=False)
    n_conversation_examples: int = field(default=0, compare=False)
    assistant_tokens: int = field(default=0, compare=False)
    n_completions_cut: int = 0      # kept rows whose completion lost tokens (data.overlong=truncate)
    max_completion_cut: int = 0     # ... the most tokens one of them lost
    kept_tokens_cut: int = 0        # ... the tokens they lost together
    overlong: str = "truncate"      # data.overlong
    n_overlong: int = 0             # rows left out by data.overlong=drop
    # (source, row, completion tokens, tokens truncating would have cut) of each of them
    overlong_rows: list[tuple[str, int, int, int]] = field(default_factory=list)
    n_checked: int = field(default=0, compare=False)  # rows in the EOS-only and pair checks (0: all)
    check_seconds: float = field(default=0.0, compare=False)  # the checks' time, this process

    @property
    def checked(self) -> int:
        return self.n_checked or self.n_rows

    @property
    def truncation_share(self) -> float:
        return self.completion_tokens_cut / self.completion_tokens if self.completion_tokens else 0.0

    @property
    def lost_share(self) -> float:
        return self.chars_lost / self.chars_decoded if self.chars_decoded else 0.0

    def summary(self) -> str:
        text = (f"tokenized {self.n_rows} rows (max_length={self.max_length}, "
                f"max_prompt_length={self.max_prompt_length}): {self.n_truncated} truncated, "
                f"{self.n_dropped} dropped")
        if self.dropped_rows:
            src, row = self.dropped_rows[0]
            text += f" (no room for a completion token; first: {src} row {row})"
        if self.overlong == "drop":
            text += f", {self.n_overlong} dropped by data.overlong=drop (a completion would be cut)"
        text += (f"; {self.completion_tokens_cut} of {self.completion_tokens} completion tokens "
                 f"({100 * self.truncation_share:.1f}%) cut by max_length; tokenizer check"
                 f"{'' if self.checked == self.n_rows else f' on the {self.checked} rows of a sample of prompts'}: "
                 f"{self.n_eos_only} completions only EOS, {self.n_identical} of {self.n_paired} "
                 f"paired rows token-identical to the other label, {100 * self.lost_share:.1f}% of "
                 f"characters lost in a decode of {self.n_decoded} rows")
        return text

    def cut_line(self) -> str | None:
        """How many kept completions ``data.max_length`` cut and by how much; None when none was."""
        if not self.n_completions_cut:
            return None
        return (f"data.max_length={self.max_length} cut {self.n_completions_cut} of "
                f"{(self.n_examples or self.n_rows) - self.n_dropped - self.n_overlong} completions: by {self.kept_tokens_cut} tokens in all, "
                f"{self.kept_tokens_cut / self.n_completions_cut:.1f} on average, {self.max_completion_cut} "
                f"at most (data.overlong=drop leaves such rows out instead)")

    def formats_line(self) -> str:
        """Rows per format, and for conversations the examples kept and assistant tokens per example."""
        text = "rows per format: " + ", ".join(f"{self.formats.get(k, 0)} {k}" for k in ("text", "chat", "conversation"))
        if self.formats.get("conversation"):
            per = self.assistant_tokens / self.n_conversation_examples if self.n_conversation_examples else 0.0
            text += (f" (-> {self.n_conversation_examples} examples kept, {per:.1f} assistant tokens per example "
                     f"after fitting)")
        return text

    def overlong_lines(self) -> list[str]:
        """One line per row that ``data.overlong=drop`` left out, naming it."""
        return [f"{src} row {row}: dropped by data.overlong=drop: its completion of {n} tokens would lose {cut} "
                f"to data.max_length={self.max_length}" for src, row, n, cut in self.overlong_rows]

    def _losses(self) -> list[tuple[str, float, str]]:
        """(check, share, what it measured) for each tokenizer check."""
        return [
            ("eos_only", self.n_eos_only / self.checked if self.checked else 0.0,
             f"{self.n_eos_only} of {self.checked} completions tokenize to EOS alone"),
            ("identical", self.n_identical / self.n_paired if self.n_paired else 0.0,
             f"{self.n_identical} of {self.n_paired} paired rows have the same completion ids as "
             f"a completion of the other label for their prompt, though the texts differ"),
            ("decode", self.lost_share,
             f"{100 * self.lost_share:.1f}% of characters lost in a decode of {self.n_decoded} rows"),
        ]

    def warnings(self) -> list[str]:
        """One line per measure above its warning threshold."""
        out = []
        if self.truncation_share > TRUNCATION_WARN_SHARE:
            out.append(f"data.max_length={self.max_length} cuts {100 * self.truncation_share:.1f}% "
                       f"of completion tokens ({self.completion_tokens_cut} of "
                       f"{self.completion_tokens}; {self.n_truncated} rows truncated, "
                       f"{self.n_dropped} dropped): raise data.max_length or lower "
                       f"data.max_prompt_length={self.max_prompt_length}")
        for check, share, measured in self._losses():
            if share > WARN_SHARE:
                out.append(f"tokenizer {self.tokenizer} loses text: {measured} "
                           f"(e.g. {self.examples[check]})")
        return out

    def problem(self) -> str | None:
        """The error to stop with when most rows lose their text, else None."""
        failing = [(check, measured) for check, share, measured in self._losses()
                   if share > FAIL_SHARE]
        if not failing:
            return None
        ex = self.examples[failing[0][0]]
        return (f"{ex.source}: row {ex.row}: tokenizer {self.tokenizer} drops text: {ex.field} "
                f"{ex.text} tokenized to {ex.tokens}; {'; '.join(m for _, m in failing)}; check "
                f"that the tokenizer files load as the tokenizer the model was trained with "
                f"(model.tokenizer_path set to a folder holding the tokenizer files alone, "
                f"without config.json, loads them as written)")


def count_formats(report: TokenizeReport, ds, src, scored, kept) -> None:
    """Fill ``report.formats`` from the input rows ``ds`` and the examples' input rows ``src``,
    scored completion tokens and kept mask."""
    n = len(ds)
    conv = np.zeros(n, dtype=bool)
    if "conversation" in ds.column_names:
        import pyarrow.compute as pc

        conv = np.asarray(pc.is_valid(ds.with_format("arrow")["conversation"]), dtype=bool)
    prompt_type = getattr(ds.features["prompt"], "dtype", None)
    if prompt_type == "string":
        chat = np.zeros(n, dtype=bool)
    elif prompt_type is None and type(ds.features["prompt"]).__name__ == "List":
        chat = np.ones(n, dtype=bool)
    else:  # datasets.Json: each row its own kind
        chat = np.array([not isinstance(p, str) for p in ds["prompt"]], dtype=bool)
    chat &= ~conv
    report.formats = {"text": int((~conv & ~chat).sum()), "chat": int(chat.sum()), "conversation": int(conv.sum())}
    from_conv = conv[np.asarray(src, dtype=np.int64)] & np.asarray(kept, dtype=bool)
    report.n_conversation_examples = int(from_conv.sum())
    report.assistant_tokens = int(np.asarray(scored)[from_conv].sum())


def _fingerprint(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") & _MASK63


def ids_fingerprint(ids) -> int:
    return _fingerprint(np.asarray(ids, dtype=np.int64).tobytes())


def _fold(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def text_fingerprint(text: str) -> int:
    """Equal for texts that differ only in whitespace or Unicode compatibility forms."""
    return _fingerprint(_fold(text).encode("utf-8"))


def identical_pairs(prompt_key, label, ids_key, text_key) -> tuple[np.ndarray, int]:
    """(mask of rows with a row of the other label for the same prompt whose completion has the
    same ids but another text, number of rows whose prompt has both labels).

    Vectorised over groups: g = (prompt, ids), k = (g, text). Row i counts when the rows of g with
    the other label hold a text other than its own: the distinct texts of (g, other label), less
    one if its own text is among them, is positive.
    """
    prompt_key, ids_key, text_key = (np.asarray(x, dtype=np.int64)
                                     for x in (prompt_key, ids_key, text_key))
    y = np.asarray(label, dtype=bool).astype(np.int64)
    if not len(y):
        return np.zeros(0, dtype=bool), 0
    pid = _group(prompt_key)
    has_label = np.zeros((pid.max() + 1, 2), dtype=bool)
    has_label[pid, y] = True
    n_paired = int(has_label[pid].all(axis=1).sum())
    gid = _group(prompt_key, ids_key)
    kid = _group(gid, text_key)
    has = np.zeros((kid.max() + 1, 2), dtype=bool)  # does text k occur with label 0 / 1 in its g
    has[kid, y] = True
    gid_of_k = np.zeros(len(has), dtype=np.int64)
    gid_of_k[kid] = gid
    n_groups = int(gid.max()) + 1
    texts = np.stack([np.bincount(gid_of_k, weights=has[:, j], minlength=n_groups)
                      for j in (0, 1)], axis=1)  # distinct texts of g per label
    other = 1 - y
    mask = texts[gid, other] - has[kid, other] > 0
    return mask, n_paired


def _group(*keys: np.ndarray) -> np.ndarray:
    """Dense ids of the distinct tuples of ``keys`` (one id per row). The keys are 63-bit hashes
    or ids; they are mixed into one 64-bit value, where two tuples of a million rows collide with
    odds near 1e-7, so a 1-D unique (fast) replaces a row-wise one (slow)."""
    mixed = np.zeros(len(keys[0]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            mixed = (mixed * np.uint64(0x9E3779B97F4A7C15)) ^ key.astype(np.uint64)
    return np.unique(mixed, return_inverse=True)[1].reshape(-1)


def check_stride(n_rows: int, k: int | None = None) -> int:
    """The checks read the rows whose prompt key is 0 modulo this: 1 (every row) up to ``k`` rows
    (default :data:`CHECK_ROWS`)."""
    return max(1, -(-n_rows // (CHECK_ROWS if k is None else k)))


def sample_indices(n: int, k: int = DECODE_SAMPLE) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``range(n)``: the same rows on every run and rank."""
    if n <= k:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def chars_lost(original: str, decoded: str) -> tuple[int, int]:
    """(characters of ``original``, how many of them are missing from ``decoded``), both after
    NFKC with whitespace removed; extra characters in the decode (BOS, spaces) do not count."""
    want = Counter("".join(unicodedata.normalize("NFKC", original).split()))
    have = Counter("".join(unicodedata.normalize("NFKC", decoded).split()))
    return sum(want.values()), sum((want - have).values())


def show_tokens(tokenizer, ids, limit: int = 80) -> str:
    """The tokens of ``ids`` as a short JSON list (one line, cut with "..." past ``limit``)."""
    text = json.dumps(tokenizer.convert_ids_to_tokens(list(ids)), ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 4] + "...]"


def show_text(text: str, limit: int = 60) -> str:
    shown = json.dumps(text, ensure_ascii=False)
    return shown if len(shown) <= limit else shown[:limit - 4] + '..."'
