"""A packed micro-batch cut into equal sequence shards, one per rank of a sequence-parallel group.

Under Ulysses sequence parallelism (``parallel.sp_size``) every rank of a group holds the same rows
(the trainer plans micro-batches by data-parallel rank, and the sequence ranks share it) and runs
the model on its own contiguous share of the tokens; attention sees the whole sequence through an
all-to-all. Everything a shard needs is decided here, from the whole batch, before the cut:

* **One row.** The rows of a :class:`~megakto.data.packing.PackedBatch` are laid end to end: a
  sequence never spans rows and ``position_ids`` restart at every sequence (and at each row's
  padding), so row ends are ordinary sequence starts for an attention that reads ``position_ids``
  (flash varlen, :mod:`megakto.model.sp_attention`). Ulysses then always runs a batch of one row,
  whatever the number of packed rows, KL rows or eval rows of the micro-batch.
* **Labels shifted before the cut.** Position t is scored when token t+1 is a completion token of
  t's own sequence; its target is token t+1. Shifting after the cut would lose the target of each
  shard's last position, which lives on the next rank.
* **Right padding** to a multiple of ``sp_size``, with positions restarting at 0: the padding is a
  sequence of its own that no real token attends to (it comes last, and causal attention looks
  back) and that is never scored. Left padding would put it in front of real tokens.
* **position_ids always**: transformers fills in ``arange`` of the local shard when none are
  passed, which under Ulysses is silently wrong.

No collectives and no model code: every rank cuts the same batch the same way, and a test can cut
it for all ranks at once (:func:`sequence_shards`) and check that the shards add up to the whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megakto.data.packing import PackedBatch

__all__ = ["IGNORE", "SequenceShard", "sequence_shard", "sequence_shards", "shifted_row"]

IGNORE = -100  # the target of a position that is not scored


@dataclass
class SequenceShard:
    """One rank's contiguous share of a micro-batch laid out as one row (each tensor (1, T / sp))."""

    input_ids: torch.Tensor  # long: the tokens this rank embeds
    position_ids: torch.Tensor  # long: each token's position in its own packed sequence
    targets: torch.Tensor  # long: token t+1 where position t is scored, IGNORE elsewhere
    target_segments: torch.Tensor  # long: the segment (pack()'s row index) of each scored target, -1 elsewhere
    n_tokens: torch.Tensor  # (S,) long: scored tokens of each segment in the whole micro-batch, not this shard
    num_segments: int  # S

    def to(self, device) -> "SequenceShard":
        moved = (t.to(device, non_blocking=True) for t in (self.input_ids, self.position_ids, self.targets,
                                                          self.target_segments, self.n_tokens))
        return SequenceShard(*moved, self.num_segments)

    @property
    def scored(self) -> torch.Tensor:
        """(1, T / sp) bool: the positions whose log-prob this rank computes."""
        return self.target_segments >= 0


def shifted_row(batch: PackedBatch, multiple: int, pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """``(input_ids, position_ids, targets, target_segments)`` of ``batch``'s rows laid end to end as
    one (1, T) row, T right-padded to a multiple of ``multiple``, targets shifted (module docstring).
    ``pad_id``: the token of the added padding (never attended to by a real token, never scored)."""
    ids, pos, seg, comp = (t.reshape(1, -1) for t in (batch.input_ids, batch.position_ids, batch.segment_ids,
                                                      batch.completion_mask))
    n = ids.shape[1]
    # Position t predicts t+1: scored when t+1 is a completion token of t's own segment. A segment
    # never spans rows, so the end of one row never predicts the start of the next.
    scored = (comp[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = torch.where(scored, ids[:, 1:], IGNORE)
    target_segments = torch.full_like(ids, -1)
    target_segments[:, :-1] = torch.where(scored, seg[:, 1:], -1)
    pad = -n % multiple
    if pad:
        tail = torch.arange(pad, dtype=pos.dtype, device=pos.device).unsqueeze(0)
        ids = torch.cat([ids, torch.full_like(tail, pad_id)], dim=1)
        pos = torch.cat([pos, tail], dim=1)  # restarts at 0: a sequence of its own
        targets = torch.cat([targets, torch.full_like(tail, IGNORE)], dim=1)
        target_segments = torch.cat([target_segments, torch.full_like(tail, -1)], dim=1)
    return ids, pos, targets, target_segments


def sequence_shards(batch: PackedBatch, sp_size: int, *, pad_id: int = 0) -> list[SequenceShard]:
    """Every rank's shard of ``batch``, rank 0 first: equal, contiguous, together the whole row."""
    if sp_size < 1:
        raise ValueError(f"sp_size must be >= 1; got {sp_size}")
    row = shifted_row(batch, sp_size, pad_id)
    segments = row[3]
    n_tokens = torch.bincount(segments[segments >= 0], minlength=batch.num_segments)
    width = row[0].shape[1] // sp_size
    return [SequenceShard(*(t[:, r * width:(r + 1) * width] for t in row), n_tokens, batch.num_segments)
            for r in range(sp_size)]


def sequence_shard(batch: PackedBatch, sp_size: int, sp_rank: int, *, pad_id: int = 0) -> SequenceShard:
    """Shard ``sp_rank`` of ``sp_size`` of ``batch`` (see :func:`sequence_shards`)."""
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank must be in [0, {sp_size}); got {sp_rank}")
    return sequence_shards(batch, sp_size, pad_id=pad_id)[sp_rank]
