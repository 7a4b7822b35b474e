"""Summed completion log-probs per segment of packed rows.

The packed counterpart of :func:`megakto.kto.sequence_logps`: rows hold several sequences end to
end, told apart by a segment id. The result for each segment equals ``sequence_logps`` on that
sequence alone (what eq. (7) calls log pi(y|x)), because

- the shift stays inside a segment: the last token of one segment does not predict the first
  token of the next, and the first token of every segment, like position 0 of a padded row, is
  never a target;
- with a block-diagonal causal attention (see :mod:`megakto.model.packed`) the logits at a
  position depend on its own segment only.

Like the reference, this materialises an fp32 (R, L-1, V) log-softmax.
"""

import torch

__all__ = ["segment_logps"]


def segment_logps(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over completion tokens, per segment.

    Args:
        logits: (R, L, V); ``logits[:, t]`` is the prediction for ``input_ids[:, t + 1]``.
        input_ids: (R, L) token ids.
        completion_mask: (R, L) bool or 0/1, aligned with ``input_ids``.
        segment_ids: (R, L) long in ``[0, num_segments)``, or -1 on padding (never scored).
        num_segments: S, the length of the outputs.

    Returns:
        ``logps`` (S,) float32 and ``n_tokens`` (S,) int64, indexed by segment id. A segment id
        that does not occur gets 0 and 0.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits must be (R, L, V) matching input_ids (R, L); got {tuple(logits.shape)} and "
            f"{tuple(input_ids.shape)}"
        )
    if completion_mask.shape != input_ids.shape or segment_ids.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask and segment_ids must match input_ids {tuple(input_ids.shape)}; got "
            f"{tuple(completion_mask.shape)} and {tuple(segment_ids.shape)}"
        )
    target_seg = segment_ids[:, 1:]
    # A target is scored only if its predictor sits in the same segment: this drops the first
    # token of every segment, exactly as sequence_logps drops position 0.
    mask = completion_mask[:, 1:].bool() & (target_seg == segment_ids[:, :-1]) & (target_seg >= 0)
    labels = input_ids[:, 1:].masked_fill(~mask, 0)  # pad ids may not be valid indices
    # fp32 even for bf16 logits (same reason as sequence_logps).
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # where, not multiply: 0 * -inf would be NaN. Unscored positions add 0 to segment 0 (clamped
    # index) so the scatter keeps static shapes instead of boolean-indexing a dynamic subset.
    token_logps = torch.where(mask, token_logps, 0.0).flatten()
    index = target_seg.clamp(min=0).flatten()
    logps = token_logps.new_zeros(num_segments).index_add(0, index, token_logps)
    n_tokens = torch.zeros(num_segments, dtype=torch.long, device=index.device).index_add(
        0, index, mask.flatten().long()
    )
    return logps, n_tokens
