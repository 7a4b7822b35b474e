"""The KL reference point z_0 of eq. (7), estimated from mismatched (x, y') pairs.

The paper estimates z_0 = KL(pi_theta(y'|x) || pi_ref(y'|x)) on the same batch by pairing each
prompt x with a completion y' taken from another example, averaging log(pi_theta / pi_ref) over
those pairs, clamping at 0 and not back-propagating through it.

Here the estimate is split in two so that the average is an exact one over the whole batch:

1. each rank and micro-batch computes :func:`kl_partial`, a ``(sum, count)`` pair;
2. the trainer all-reduces the pairs once per optimizer step, summing over every data-parallel
   rank and every gradient-accumulation micro-batch;
3. :func:`finalize_kl` divides and clamps.

The reference point therefore depends on the global batch only, not on how it was sharded or
packed. Peers average differently: TRL and LLaMA-Factory (and OpenRLHF, ms-swift) take a mean of
per-rank means, and NeMo-Aligner clamps each micro-batch's mean before averaging. Both are biased
as soon as ranks hold different numbers of KL pairs, which is the normal case with packing; the
second is also biased upward, since E[max(0, X)] >= max(0, E[X]).

Simplifications: every pair counts, including ones whose log-ratio happens to be 0 (HALOs drops
those from the count); the estimate spans exactly one optimizer step's global batch.

Sums are kept in float64: they add up thousands of log-ratios of tens of nats each across ranks.
"""

import torch

__all__ = ["kl_partial", "raw_kl", "finalize_kl"]


def kl_partial(
    policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(sum, count)`` of policy - ref log-ratios over local mismatched pairs.

    Args:
        policy_kl_logps: (N,) summed completion log-probs of the mismatched pairs under the policy.
        ref_kl_logps: (N,) the same under the reference model. N may be 0.

    Returns:
        Two detached 0-dim float64 tensors on the inputs' device: the sum of the N log-ratios and
        N itself, ready to be all-reduced with SUM.
    """
    if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.dim() != 1:
        raise ValueError(
            f"policy_kl_logps and ref_kl_logps must both be (N,); got "
            f"{tuple(policy_kl_logps.shape)} and {tuple(ref_kl_logps.shape)}"
        )
    logratio = policy_kl_logps.detach().double() - ref_kl_logps.detach().double()
    total = logratio.sum()
    count = torch.tensor(float(logratio.numel()), dtype=torch.float64, device=logratio.device)
    return total, count


def raw_kl(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` as a detached 0-dim float64 tensor, before the clamp; 0 when ``count == 0``.

    Negative when the policy, on the mismatched pairs, puts less mass than the reference: the
    estimate is a sample mean, and eq. (7) clamps it (:func:`finalize_kl`). Logged as ``kl/raw``
    beside the clamped value, so that a reference point pinned at 0 shows how far below it sits.

    Written with ``torch.where`` rather than a Python ``if`` so that no value is copied to the
    host (no device sync) in the middle of a step.
    """
    total = torch.as_tensor(total, dtype=torch.float64).detach()
    count = torch.as_tensor(count, dtype=torch.float64, device=total.device).detach()
    nonempty = count > 0
    return torch.where(nonempty, total / torch.where(nonempty, count, 1.0), 0.0)


def finalize_kl(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``max(0, total / count)`` as a detached 0-dim float32 tensor; 0 when ``count == 0``."""
    return raw_kl(total, count).clamp_min(0.0).float()
