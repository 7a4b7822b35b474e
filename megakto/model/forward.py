"""Model forward -> per-sequence completion log-probs.

The log-prob function is injectable: the default is the ground-truth
:func:`megakto.kto.sequence_logps` over full logits; a chunked or vocabulary-parallel version has
the same signature and replaces it without touching the trainer.
"""

from __future__ import annotations

from typing import Callable

import torch

from megakto.data.collate import Batch
from megakto.kto import sequence_logps

__all__ = ["LogpsFn", "completion_logps"]

LogpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def completion_logps(model, batch: Batch, logps_fn: LogpsFn = sequence_logps) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed completion log-probs and (B,) completion token counts of ``batch``."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return logps_fn(out.logits, batch.input_ids, batch.completion_mask)
