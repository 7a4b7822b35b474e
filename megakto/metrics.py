"""Per-step metrics under TRL's names, accumulated as per-rank sums and counts, reduced once by
the trainer, then divided: exact global means whatever the rows per rank."""

from __future__ import annotations

import torch

__all__ = ["StepSums", "step_metrics", "reference_point_metrics"]

_KEYS = ("loss", "rows", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected",
         "count_chosen", "count_rejected", "target_tokens", "desirable_tokens", "tokens", "nll_chosen", "nll",
         "single_class", "abs_rewards", "slopes_chosen", "slopes_rejected")


class StepSums:
    def __init__(self):
        self.values: dict[str, float] = {k: 0.0 for k in _KEYS}

    def add_micro(self, micro, *, logps, n_tokens, tokens: int) -> None:
        """:meth:`add` for a runner's :class:`~megakto.runners.base.MicroLoss`."""
        self.add(losses=micro.losses, rewards=micro.rewards, logps=logps, desirable=micro.desirable,
                 n_tokens=n_tokens, tokens=tokens, slopes=micro.slopes)

    def add(self, *, losses, rewards, logps, desirable: torch.Tensor, n_tokens, tokens: int, slopes=None) -> None:
        v, d = self.values, desirable.float()
        logps = logps.detach().float()
        v["loss"] += float(losses.detach().sum())
        v["rows"] += len(desirable)
        v["rewards_chosen"] += float((rewards * d).sum())
        v["rewards_rejected"] += float((rewards * (1 - d)).sum())
        v["logps_chosen"] += float((logps * d).sum())
        v["logps_rejected"] += float((logps * (1 - d)).sum())
        v["count_chosen"] += float(d.sum())
        v["count_rejected"] += float((1 - d).sum())
        v["target_tokens"] += float(n_tokens.sum())
        v["desirable_tokens"] += float((n_tokens.float() * d).sum())
        v["tokens"] += tokens
        v["nll_chosen"] += float(-(logps * d).sum())
        v["nll"] += float(-logps.sum())
        v["single_class"] += float(len(desirable) > 0 and bool(d.min() == d.max()))  # a one-class micro-batch
        v["abs_rewards"] += float(rewards.abs().sum())
        if slopes is not None:
            v["slopes_chosen"] += float((slopes.float() * d).sum())
            v["slopes_rejected"] += float((slopes.float() * (1 - d)).sum())


def step_metrics(s: dict[str, float], *, kl: float, elapsed: float, loss_type: str,
                 sft_weight: float) -> dict[str, float]:
    def mean(num: str, den: str) -> float:
        return s[num] / s[den] if s[den] else float("nan")

    m = {"kl": kl, "count/chosen": s["count_chosen"], "count/rejected": s["count_rejected"],
         "count/single_class_micro_batches": s["single_class"],
         "tokens_per_s": s["target_tokens"] / elapsed, "samples_per_s": s["rows"] / elapsed}
    if loss_type == "sft":
        m["loss"] = mean("nll", "target_tokens")  # mean per-token NLL of every completion
        return m
    m.update({"loss": s["loss"] / s["rows"],
              "rewards/chosen": mean("rewards_chosen", "count_chosen"),
              "rewards/rejected": mean("rewards_rejected", "count_rejected"),
              "logps/chosen": mean("logps_chosen", "count_chosen"),
              "logps/rejected": mean("logps_rejected", "count_rejected")})
    if s["count_chosen"] and s["count_rejected"]:
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    # Mean sigmoid slope per class (1 = z at 0, the steepest; 0 = saturated, no gradient).
    for cls in ("chosen", "rejected"):
        if s[f"count_{cls}"]:
            m[f"kto/slope/{cls}"] = s[f"slopes_{cls}"] / s[f"count_{cls}"]
    if sft_weight:
        m["sft_nll"] = s["nll_chosen"] / max(s["desirable_tokens"], 1.0)
        m["loss"] += sft_weight * m["sft_nll"]
    return m


def reference_point_metrics(raw: list[float], *, beta: float, mean_abs_reward: float,
                            previous_raw: float | None) -> dict[str, float]:
    """What the reference point z_ref = beta * max(0, KL estimate) of eq. (7) did this step.

    Args:
        raw: the step's KL estimates before the clamp, one per reference point used (one at
            ``kto.kl_scope=step``, one per micro-batch at ``microbatch``), in nats.
        beta: the KTO beta.
        mean_abs_reward: mean |beta * log(pi / pi_ref)| over the step's rows.
        previous_raw: the previous step's ``kl/raw``; None on a run's (or a resume's) first step.

    Returns ``kl/raw`` (mean estimate before the clamp), ``kl/clamped`` (share of the estimates
    that were negative, so z_ref was 0), ``kl/z_ref`` (mean beta * clamped estimate: the reference
    point in reward units), ``kl/z_ref_over_reward`` (z_ref against the rewards' mean size: near 1
    the reference point has moved as far as the rewards and eats their margin) and
    ``kl/raw_change`` (|raw - previous raw|: the estimate's step-to-step noise and drift).
    """
    raw_mean = sum(raw) / len(raw)
    z_ref = beta * sum(max(0.0, r) for r in raw) / len(raw)
    out = {"kl/raw": raw_mean, "kl/clamped": sum(r < 0 for r in raw) / len(raw), "kl/z_ref": z_ref}
    if mean_abs_reward > 0:
        out["kl/z_ref_over_reward"] = z_ref / mean_abs_reward
    if previous_raw is not None:
        out["kl/raw_change"] = abs(raw_mean - previous_raw)
    return out
