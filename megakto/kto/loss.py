"""The KTO loss, eq. (7) of Ethayarajh et al. 2024, over plain tensors.

Inputs are per-example sums of completion-token log-probs (no length normalisation, as in the
paper and every peer implementation). The reference point ``kl`` arrives already reduced over the
global batch, detached and clamped at 0 (see :mod:`megakto.kto.kl`); this function never talks to
other ranks, so every rank runs the same shapes whatever its desirable/undesirable mix.

The per-example losses are returned unreduced: how they are averaged (an exact global mean over
data-parallel ranks and gradient-accumulation micro-batches) is the trainer's decision.

Per-row weights (an extension; the paper has none) multiply each row's term after lambda_D /
lambda_U: a row of weight w contributes w times its unweighted loss and gradient, weight 0 nothing.
They leave the reference point alone: z_0 estimates KL(pi_theta || pi_ref) over mismatched pairs,
which carry no label and so no confidence in one (see :mod:`megakto.kto.kl`).
"""

from typing import NamedTuple

import torch

__all__ = ["KTOLossOutput", "kto_loss", "LOSS_TYPES"]

# "kto": eq. (7). "apo_zero_unpaired": the unpaired APO-zero loss (as TRL names it), which pushes
# desirable log-ratios up and undesirable ones down with no KL reference point.
LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOLossOutput(NamedTuple):
    losses: torch.Tensor  # (B,) per-example losses (lambda and row weights applied), the log-probs' dtype
    rewards: torch.Tensor  # (B,) beta * (policy - ref) log-ratio, detached (the implied reward)
    kl: torch.Tensor  # () the reference point used; for apo_zero_unpaired, the input unchanged
    # (B,) sigmoid(z) * sigmoid(-z) / (1/4), detached: the share of its largest value that the
    # sigmoid passes to the gradient. d loss_i / d log pi_theta(y_i|x_i) = -+ lambda * beta * slope_i / 4,
    # so slope 1 is z = 0 and slope -> 0 is a saturated example that no longer learns.
    slopes: torch.Tensor


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    weights: torch.Tensor | None = None,
) -> KTOLossOutput:
    """Per-example KTO losses.

    Args:
        policy_logps: (B,) summed completion log-probs under the policy (carries the gradient).
        ref_logps: (B,) the same under the frozen reference model.
        desirable: (B,) bool, True where the completion is labelled desirable.
        kl: () the reference point z_0 of eq. (7), already reduced, detached and clamped >= 0.
        beta: the KTO beta; scales the implied reward beta * log(pi / pi_ref).
        desirable_weight, undesirable_weight: lambda_D and lambda_U of eq. (7); see eq. (8) and
            :func:`megakto.kto.weights.check_weights` for how to pick them.
        loss_type: one of ``LOSS_TYPES``.
        weights: (B,) per-row weights >= 0 multiplying each row's loss (None: all 1).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; allowed values: {', '.join(LOSS_TYPES)}")
    if policy_logps.dim() != 1 or policy_logps.shape != ref_logps.shape:
        raise ValueError(
            f"policy_logps and ref_logps must both be (B,); got {tuple(policy_logps.shape)} and "
            f"{tuple(ref_logps.shape)}"
        )
    if desirable.shape != policy_logps.shape or desirable.dtype != torch.bool:
        raise ValueError(
            f"desirable must be a bool tensor of shape {tuple(policy_logps.shape)}; got "
            f"{desirable.dtype} {tuple(desirable.shape)}"
        )
    if weights is not None and weights.shape != policy_logps.shape:
        raise ValueError(f"weights must be (B,) = {tuple(policy_logps.shape)}; got {tuple(weights.shape)}")
    kl = torch.as_tensor(kl, device=policy_logps.device).detach()
    if kl.dim() != 0:
        raise ValueError(f"kl must be a 0-dim tensor; got shape {tuple(kl.shape)}")

    logratio = policy_logps - ref_logps
    if loss_type == "kto":
        # z = beta * (r_theta(x, y) - z_0). The paper detaches z_0 (no gradient through the
        # reference point), which is what makes the gradient take the form of Proposition 4.1.
        z = beta * (logratio - kl.to(logratio.dtype))
    else:
        z = beta * logratio
    # Desirable: lambda_D * (1 - sigmoid(z)); undesirable: lambda_U * (1 - sigmoid(-z)) for "kto"
    # and lambda_U * sigmoid(z) for apo_zero_unpaired, which are the same expression. Writing
    # 1 - sigmoid(a) as sigmoid(-a) avoids cancellation when sigmoid(a) is close to 1.
    # torch.where over the mask (instead of indexing) keeps shapes fixed and is NaN-free when one
    # class is absent from the batch.
    losses = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-z),
        undesirable_weight * torch.sigmoid(z),
    )
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    rewards = (beta * logratio).detach()
    z = z.detach()
    slopes = 4 * torch.sigmoid(z) * torch.sigmoid(-z)
    return KTOLossOutput(losses=losses, rewards=rewards, kl=kl, slopes=slopes)
