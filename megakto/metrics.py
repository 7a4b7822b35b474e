"""Per-step metrics under TRL's names, accumulated as per-rank sums and counts, reduced once by
the trainer, then divided: exact global means whatever the rows per rank."""

from __future__ import annotations

import torch

__all__ = ["StepSums", "step_metrics", "router_metrics", "reference_point_metrics", "weight_metrics"]

_KEYS = ("loss", "rows", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected",
         "count_chosen", "count_rejected", "target_tokens", "desirable_tokens", "tokens", "nll_chosen", "nll",
         "single_class", "abs_rewards", "slopes_chosen", "slopes_rejected")


# Known on the host without reading the device: the rows and tokens of each micro-batch.
_HOST_KEYS = ("rows", "tokens")
_DEVICE_KEYS = tuple(k for k in _KEYS if k not in _HOST_KEYS)


class StepSums:
    """One rank's sums over a step's micro-batches. :meth:`add` keeps them on the device as one
    float64 vector and reads nothing back, so the CPU keeps queueing work ahead of the GPU (each
    ``float(tensor)`` would wait for it, ~15 per micro-batch); :attr:`values` brings them to the host
    in one read, once per step. Each sum is taken in its input's dtype and accumulated in float64, in
    micro-batch order, as ``float()`` into a Python float did: the same numbers."""

    def __init__(self):
        self._device: torch.Tensor | None = None
        self._host = {k: 0.0 for k in _HOST_KEYS}
        self._router: torch.Tensor | None = None  # [aux sum, micro-batches, tokens, counts (L·E)...]
        self._router_shape: tuple[int, int] = (0, 0)

    @property
    def values(self) -> dict[str, float]:
        device = self._device.tolist() if self._device is not None else [0.0] * len(_DEVICE_KEYS)
        both = {**dict(zip(_DEVICE_KEYS, device)), **self._host}
        out = {k: both[k] for k in _KEYS}
        if self._router is not None:
            out.update(_router_values(self._router.tolist(), *self._router_shape))
        return out

    def add_micro(self, micro, *, logps, n_tokens, tokens: int) -> None:
        """:meth:`add` for a runner's :class:`~megakto.runners.base.MicroLoss`, and
        :meth:`add_router` when it carries the router's balance."""
        self.add(losses=micro.losses, rewards=micro.rewards, logps=logps, desirable=micro.desirable,
                 n_tokens=n_tokens, tokens=tokens, slopes=micro.slopes)
        if micro.router is not None:
            self.add_router(micro.router)

    def add_router(self, balance) -> None:
        """One forward's :class:`~megakto.kto.router_aux.RouterBalance`: its aux loss (summed, with a
        count of forwards) and its per-layer expert counts with the tokens counted, kept on the device."""
        vector = torch.cat([torch.stack([balance.loss.detach().double(), torch.ones_like(balance.tokens),
                                         balance.tokens]), balance.counts.reshape(-1)])
        self._router = vector if self._router is None else self._router + vector
        self._router_shape = tuple(balance.counts.shape)

    def add(self, *, losses, rewards, logps, desirable: torch.Tensor, n_tokens, tokens: int, slopes=None) -> None:
        d = desirable.float()
        logps, rewards = logps.detach().float(), rewards.detach()
        zero = d.new_zeros(())
        sums = {
            "loss": losses.detach().sum(),
            "rewards_chosen": (rewards * d).sum(),
            "rewards_rejected": (rewards * (1 - d)).sum(),
            "logps_chosen": (logps * d).sum(),
            "logps_rejected": (logps * (1 - d)).sum(),
            "count_chosen": d.sum(),
            "count_rejected": (1 - d).sum(),
            "target_tokens": n_tokens.sum(),
            "desirable_tokens": (n_tokens.float() * d).sum(),
            "nll_chosen": -(logps * d).sum(),
            "nll": -logps.sum(),
            # a one-class micro-batch
            "single_class": (d.min() == d.max()).float() if len(desirable) else zero,
            "abs_rewards": rewards.abs().sum(),
            "slopes_chosen": (slopes.detach().float() * d).sum() if slopes is not None else zero,
            "slopes_rejected": (slopes.detach().float() * (1 - d)).sum() if slopes is not None else zero,
        }
        where = losses.device
        vector = torch.stack([sums[k].to(device=where, dtype=torch.float64) for k in _DEVICE_KEYS])
        self._device = vector if self._device is None else self._device + vector
        self._host["rows"] += len(desirable)
        self._host["tokens"] += tokens


def _router_values(flat: list[float], layers: int, experts: int) -> dict[str, float]:
    """The router sums as named scalars, the shape they came in: every rank has the same model, so
    the same keys, and :func:`~megakto.distributed.comm.all_reduce_dict` sums them by name."""
    out = {"router_aux": flat[0], "router_forwards": flat[1], "router_tokens": flat[2]}
    for i, count in enumerate(flat[3:]):
        out[f"router_count/{i // experts:04d}/{i % experts:04d}"] = count
    return out


def router_metrics(s: dict[str, float]) -> dict[str, float]:
    """The router's metrics from the step's reduced sums (empty without them): ``router/aux_loss``,
    the mean balancing loss over the step's forwards, and per MoE layer i the share of tokens sent
    to its least and most used expert, ``router/layer{i}/load_min`` and ``load_max`` (each token
    goes to k experts, so the shares sum to k and are k / E when balanced; 1 means every token of
    the step), with ``router/load_min`` and ``router/load_max`` over all layers."""
    if not s.get("router_forwards"):
        return {}
    loads: dict[int, list[float]] = {}
    for key, count in s.items():
        if key.startswith("router_count/"):
            layer = int(key.split("/")[1])
            loads.setdefault(layer, []).append(count / s["router_tokens"] if s["router_tokens"] else float("nan"))
    m = {"router/aux_loss": s["router_aux"] / s["router_forwards"]}
    for layer in sorted(loads):
        m[f"router/layer{layer}/load_min"], m[f"router/layer{layer}/load_max"] = min(loads[layer]), max(loads[layer])
    m["router/load_min"] = min(m[f"router/layer{i}/load_min"] for i in loads)
    m["router/load_max"] = max(m[f"router/layer{i}/load_max"] for i in loads)
    return m


def step_metrics(s: dict[str, float], *, kl: float, elapsed: float, loss_type: str,
                 sft_weight: float) -> dict[str, float]:
    def mean(num: str, den: str) -> float:
        return s[num] / s[den] if s[den] else float("nan")

    m = {"kl": kl, "count/chosen": s["count_chosen"], "count/rejected": s["count_rejected"],
         "count/single_class_micro_batches": s["single_class"],
         "tokens_per_s": s["target_tokens"] / elapsed, "samples_per_s": s["rows"] / elapsed}
    m.update(router_metrics(s))
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


def weight_metrics(labels, weights) -> dict[str, float]:
    """Per-row weights of a step's global batch: ``weight/chosen`` and ``weight/rejected``, the summed
    weights of each class (``count/*`` stay row counts), and ``weight/zero``, the rows of weight 0
    (they take no part in the loss)."""
    chosen = sum(w for d, w in zip(labels, weights) if d)
    rejected = sum(w for d, w in zip(labels, weights) if not d)
    return {"weight/chosen": float(chosen), "weight/rejected": float(rejected),
            "weight/zero": float(sum(w == 0 for w in weights))}
