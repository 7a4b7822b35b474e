"""Packed sequences: several (prompt, completion) rows share one row of the model's input.

A padded batch spends compute on pad tokens in proportion to the spread of lengths; KTO data
(short refusals next to long answers) is spread widely. Packing places whole sequences end to end
in rows of a fixed token budget, and the attention is kept block-diagonal so no sequence sees
another (see :mod:`megakto.model.packed`). Each packed sequence is a *segment*; ``position_ids``
restart at 0 at every segment start, which is both what rotary embeddings need and how
transformers recognises packed input.

A completion may hold context tokens (a conversation's user and tool turns between its assistant
turns, :mod:`megakto.data.context_ids`): they are laid out as tokens and left out of the
completion mask.

Simplifications: a sequence is never split across rows (a KTO log-prob needs the whole
completion in one forward), and rows are padded to the longest row of the batch, not to the
budget.

This module only arranges token ids; it holds no model code and no collectives, so every rank can
compute the same arrangement from the same lengths without communicating.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import torch

from megakto.data.context_ids import split_completion

__all__ = ["PackedBatch", "pack", "pad_rows", "first_fit_decreasing", "balance_by_tokens", "plan_micro_batches"]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (R, L) long, pad_id after the last segment of a row
    position_ids: torch.Tensor  # (R, L) long, 0 at every segment start and at the first pad
    completion_mask: torch.Tensor  # (R, L) long, 1 on completion tokens of input_ids
    segment_ids: torch.Tensor  # (R, L) long, index into pack()'s ``rows``; -1 on padding
    num_segments: int  # S == len(rows); segment_logps returns (S,) in input order

    def to(self, device) -> "PackedBatch":
        return PackedBatch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.position_ids, self.completion_mask, self.segment_ids)
            ),
            self.num_segments,
        )

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens; ``input_ids.numel() - num_tokens`` is the padding."""
        return int((self.segment_ids >= 0).sum())


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to at most ``capacity`` each.

    Longest first, each into the first bin it fits (ties: lower index first), so the result
    depends on the lengths alone. FFD uses at most 11/9 OPT + 6/9 bins (Dósa 2007); with many
    short sequences it is usually optimal. Within a bin, indices are in placement order.
    """
    if capacity < 1:
        raise ValueError(f"max_tokens_per_row must be >= 1; got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(
                f"sequence {i} has {n} tokens, more than max_tokens_per_row={capacity}; "
                f"max_length must be <= max_tokens_per_row"
            )
        if n < 1:
            raise ValueError(f"sequence {i} is empty (0 tokens); nothing to pack")
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


def pack(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_tokens_per_row: int,
    pad_id: int,
    *,
    pad_to_multiple_of: int = 1,
) -> PackedBatch:
    """Pack (prompt_ids, completion_ids) pairs into as few rows as first-fit-decreasing finds.

    Segment ``i`` of the result is ``rows[i]``, wherever it lands, so per-segment results come
    back in input order. The row width L is the longest packed row rounded up to
    ``pad_to_multiple_of`` (fixed shapes for kernels or pipeline stages want a multiple). Padding
    forms its own segment for attention (positions restart at 0) but has segment id -1 and is
    never scored.
    """
    if not rows:
        raise ValueError("pack() needs at least one row")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1; got {pad_to_multiple_of}")
    lengths = [len(p) + len(c) for p, c in rows]
    bins = first_fit_decreasing(lengths, max_tokens_per_row)
    width = max(sum(lengths[i] for i in b) for b in bins)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    shape = (len(bins), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    completion_mask = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            p, (c, scored) = rows[i][0], split_completion(rows[i][1])
            end = start + lengths[i]
            input_ids[r, start:end] = torch.tensor([*p, *c], dtype=torch.long)
            position_ids[r, start:end] = torch.arange(lengths[i])
            completion_mask[r, start + len(p) : end] = torch.tensor(scored, dtype=torch.long)
            segment_ids[r, start:end] = i
            start = end
        # The pad tail restarts at 0 so that transformers' packed-sequence detection (a position
        # that does not follow its predecessor by +1 starts a new sequence) fences it off too.
        position_ids[r, start:] = torch.arange(width - start)
    return PackedBatch(input_ids, position_ids, completion_mask, segment_ids, len(rows))


def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> PackedBatch:
    """One sequence per row, right-padded: the unpacked layout in the packed representation."""
    lengths = [len(p) + len(c) for p, c in rows]
    width = max(lengths)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    completion_mask = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    for i, ((p, c), n) in enumerate(zip(rows, lengths)):
        c, scored = split_completion(c)
        input_ids[i, :n] = torch.tensor([*p, *c], dtype=torch.long)
        position_ids[i, :n] = torch.arange(n)
        position_ids[i, n:] = torch.arange(width - n)  # the pad tail is a segment of its own
        completion_mask[i, len(p):n] = torch.tensor(scored, dtype=torch.long)
        segment_ids[i, :n] = i
    return PackedBatch(input_ids, position_ids, completion_mask, segment_ids, len(rows))


def balance_by_tokens(lengths: Sequence[int], num_bins: int) -> list[list[int]]:
    """Split indices ``0..len(lengths)-1`` into ``num_bins`` groups of near-equal total length.

    Greedy LPT: longest first, each to the currently lightest group (ties: lower group index).
    The result is a function of ``lengths`` alone, so every data-parallel rank computes the same
    split without communication. Heaviest minus lightest group is at most the largest length
    (the last item put on the heaviest group went to the then-lightest one). Indices within a
    group are ascending. With fewer indices than bins some groups are empty; the caller decides
    whether that is allowed.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1; got {num_bins}")
    groups: list[list[int]] = [[] for _ in range(num_bins)]
    lightest = [(0, k) for k in range(num_bins)]  # a heap of (load, group)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, k = heapq.heappop(lightest)
        groups[k].append(i)
        heapq.heappush(lightest, (load + lengths[i], k))
    return [sorted(g) for g in groups]



def plan_micro_batches(lengths: Sequence[int], labels: Sequence[bool], num_micro_batches: int) -> list[list[int]]:
    """Split a global batch into ``num_micro_batches`` micro-batches of equal row count and
    near-equal token count, each holding both classes whenever the batch has at least
    ``num_micro_batches`` rows of each.

    Micro-batch k gets ``nD // B + (k < nD % B)`` desirable rows and the rest undesirable (a
    single-class micro-batch is KTO's classic failure under per-micro-batch statistics). Within
    each class the rows go longest first to the lightest micro-batch with room, the undesirable
    rows continuing from the loads the desirable ones left, so tokens even out. Data-parallel
    rank r owns micro-batches ``r*ga .. r*ga+ga-1``; equal tokens per micro-batch means equal
    work per rank. A function of lengths and labels alone, so every rank computes the same plan
    without communication.
    """
    n, b = len(lengths), num_micro_batches
    if b < 1 or n % b:
        raise ValueError(f"{n} rows do not split into {b} equal micro-batches")
    size = n // b
    desirable = [i for i in range(n) if labels[i]]
    quota = {True: [len(desirable) // b + (k < len(desirable) % b) for k in range(b)]}
    quota[False] = [size - q for q in quota[True]]
    bins: list[list[int]] = [[] for _ in range(b)]
    load = [0] * b
    for cls in (True, False):
        room = list(quota[cls])
        for i in sorted((i for i in range(n) if bool(labels[i]) == cls), key=lambda i: (-lengths[i], i)):
            k = min((k for k in range(b) if room[k]), key=lambda k: (load[k], k))
            bins[k].append(i)
            load[k] += lengths[i]
            room[k] -= 1
    return [sorted(g) for g in bins]
