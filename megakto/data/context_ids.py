"""Context tokens inside a completion, written as negative ids.

A conversation's completion is every assistant turn, but the user and tool turns between them are
context: the model reads them and is not scored on them. Rather than carry a mask beside every
(prompt_ids, completion_ids) pair through the step plan, the KL rows, the reference cache and
the batchers, a context token inside a completion is stored as ``-1 - id``: the pair keeps its
shape, lengths stay ``len(prompt) + len(completion)``, fitting to ``max_length`` slices both
alike, and the reference cache's key (the ids) tells a scored token from a context one. Only the
layouts that build model input (:func:`megakto.data.packing.pack`, ``pad_rows``,
:func:`megakto.data.collate.collate`) read the sign, through :func:`split_completion`.

Rows in the ``(prompt, completion)`` format have no negative ids, so they lay out exactly as before.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["as_context", "split_completion", "scored_tokens"]


def as_context(ids: Sequence[int]) -> list[int]:
    """``ids`` marked as context: read by the model, never scored."""
    return [-1 - int(t) for t in ids]


def split_completion(completion_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(token ids, 1 where the token is scored and 0 where it is context)."""
    ids = [int(t) for t in completion_ids]
    return [t if t >= 0 else -1 - t for t in ids], [int(t >= 0) for t in ids]


def scored_tokens(completion_ids: Sequence[int]) -> int:
    """How many tokens of the completion are scored."""
    return sum(1 for t in completion_ids if t >= 0)
