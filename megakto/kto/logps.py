"""Summed completion log-probs from full-vocabulary logits.

This is the reference implementation: it materialises an fp32 (B, T-1, V) log-softmax, which is
simple and exact but memory-hungry for large vocabularies. Faster variants must match it.
"""

import torch

__all__ = ["sequence_logps"]


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over completion tokens, per sequence.

    Args:
        logits: (B, T, V); ``logits[:, t]`` is the prediction for ``input_ids[:, t + 1]``.
        input_ids: (B, T) token ids.
        completion_mask: (B, T) bool or 0/1; 1 where ``input_ids[b, t]`` is a completion token
            (prompt and padding are 0). Aligned with ``input_ids``, not with ``logits``.

    Returns:
        ``logps`` (B,) float32, the summed log-probs (what eq. (7) calls log pi(y|x)), and
        ``n_tokens`` (B,) int64, how many tokens were summed.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits must be (B, T, V) matching input_ids (B, T); got {tuple(logits.shape)} and "
            f"{tuple(input_ids.shape)}"
        )
    if completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask must match input_ids {tuple(input_ids.shape)}; got "
            f"{tuple(completion_mask.shape)}"
        )
    # Shift: position t predicts token t + 1, so the first token is never scored (it has no
    # context) and the last logit predicts nothing.
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    # Masked positions may hold a pad id such as -100 that is not a valid index; gather any valid
    # id there and discard the result below.
    labels = labels.masked_fill(~mask, 0)
    # fp32 even for bf16 logits: log-softmax over a large vocabulary in bf16 loses ~3 digits.
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # where, not multiply: 0 * -inf (a token with -inf logit outside the completion) would be NaN.
    logps = torch.where(mask, token_logps, 0.0).sum(-1)
    return logps, mask.sum(-1)
