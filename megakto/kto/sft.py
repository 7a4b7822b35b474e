"""The negative log-likelihood terms the trainer adds beside eq. (7), over plain tensors.

Both are means per completion token over the whole global batch, however it is split into
micro-batches and ranks: each micro-batch contributes its token-summed NLL divided by the global
batch's token count, so the contributions add up to the exact global mean (the trainer, not this
module, knows that count and sums the contributions through the engine's gradient accumulation).

- ``kto.loss_type: sft``: the plain causal-LM loss on every completion (a throughput baseline on
  the same engine and tokens).
- ``kto.sft_weight``: an SFT term on the desirable completions only, added to the KTO loss.
"""

from __future__ import annotations

import torch

__all__ = ["nll_share"]


def nll_share(logps: torch.Tensor, total_tokens: int, mask: torch.Tensor | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """This micro-batch's share of a global mean per-token NLL.

    ``logps``: (B,) per-example sums of completion-token log-probs; ``total_tokens``: completion
    tokens of the rows being averaged over the global batch (the desirable rows' alone when
    ``mask`` selects them); ``mask``: (B,) bool, the rows that count (None: all). Returns a scalar
    ``-sum(logps[mask]) / total_tokens`` (``total_tokens`` of 0, a batch with no such rows, counts
    as 1 so the term is 0 rather than NaN); ``weights``: (B,) per-row weights scaling each row's
    NLL (None: all 1; the token count stays unweighted, so weight w scales the row's share by w).
    """
    if weights is not None:
        logps = logps * weights.to(logps.dtype)
    if mask is not None:
        logps = torch.where(mask, logps, torch.zeros_like(logps))
    return -logps.sum() / max(int(total_tokens), 1)
