"""Rows of token ids -> right-padded tensors.

A KTO row is a prompt followed by a completion; only completion tokens count towards the
sequence log-probability, so the collator carries a completion mask aligned with ``input_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megakto.data.context_ids import split_completion

__all__ = ["Batch", "collate"]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    completion_mask: torch.Tensor  # (B, T) long, 1 on completion tokens of input_ids

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.completion_mask)))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> Batch:
    """``rows`` are (prompt_ids, completion_ids) pairs; returns one right-padded batch."""
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        c, scored = split_completion(c)  # context tokens inside a completion are not scored
        input_ids[i, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, len(p) : n] = torch.tensor(scored, dtype=torch.long)
    return Batch(input_ids, attention_mask, completion_mask)
