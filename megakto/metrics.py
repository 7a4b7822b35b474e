"""Per-step metrics under TRL's names, accumulated as per-rank sums and counts, reduced once by
the trainer, then divided: exact global means whatever the rows per rank."""

from __future__ import annotations

import torch

__all__ = ["StepSums", "step_metrics"]

_KEYS = ("loss", "rows", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected",
         "count_chosen", "count_rejected", "target_tokens", "desirable_tokens", "tokens", "nll_chosen", "nll",
         "single_class")


class StepSums:
    def __init__(self):
        self.values: dict[str, float] = {k: 0.0 for k in _KEYS}

    def add(self, *, losses, rewards, logps, desirable: torch.Tensor, n_tokens, tokens: int) -> None:
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
    if sft_weight:
        m["sft_nll"] = s["nll_chosen"] / max(s["desirable_tokens"], 1.0)
        m["loss"] += sft_weight * m["sft_nll"]
    return m
