"""A micro-batch's (prompt_ids, completion_ids) pairs -> the model's input, one way for the whole run.

The runners (megakto/runners/) turn each micro-batch of a step into model input through a
:class:`Batcher` they receive at construction, and so do the online references and the dry run
(``launch/train_kto.py --dry-run``), which logs the padding of the very batches a run builds.
The settings (``data.packing``, ``data.max_tokens_per_row``, the pad id, the device) are fixed when
the run is set up: nothing asks the trainer per micro-batch.

Packed (``data.packing: true``): whole sequences end to end in rows of ``max_tokens_per_row``
tokens (:func:`~megakto.data.packing.pack`); else one sequence a row, padded to the longest
(:func:`~megakto.data.packing.pad_rows`). Both give a :class:`~megakto.data.packing.PackedBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megakto.data.packing import PackedBatch, pack, pad_rows

__all__ = ["Batcher", "Pairs"]

Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]


@dataclass(frozen=True)
class Batcher:
    """``pad_id``: the tokenizer's pad token; ``packing``, ``max_tokens_per_row``: the config's
    ``data`` settings; ``device``: where the model reads its input."""

    pad_id: int
    packing: bool
    max_tokens_per_row: int
    device: torch.device | str = "cpu"

    @classmethod
    def for_run(cls, data, pad_id: int, device: torch.device | str = "cpu") -> "Batcher":
        """The batcher of a run whose config's ``data`` section is ``data``."""
        return cls(pad_id, data.packing, data.max_tokens_per_row, device)

    def layout(self, pairs: Pairs) -> PackedBatch:
        """The micro-batch's rows on the host."""
        return pack(pairs, self.max_tokens_per_row, self.pad_id) if self.packing else pad_rows(pairs, self.pad_id)

    def __call__(self, pairs: Pairs) -> PackedBatch:
        """The micro-batch's rows on ``device``, what the model is fed."""
        return self.layout(pairs).to(self.device)
