"""Training-health checks: the ways a KTO run goes wrong while its log looks calm, each with the
fix to try.

Pure functions over the step metrics the trainer already reduces (``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``kl``, ``loss``, ``grad_norm``; TRL's names) and the
held-out metrics: no collectives, every rank could run them and reach the same verdict, rank 0
prints them. :class:`HealthMonitor` keeps the history and rate-limits each symptom.

The symptoms (Ethayarajh et al. 2024 and the peers' issue trackers):

* ``rewards_falling``: the implied rewards of desirable *and* undesirable completions both fall
  (likelihood displacement: the policy lowers every completion's log-probability, so the margin
  says little and held-out accuracy drifts to chance);
* ``kl_rising``: the KL estimate z_ref climbs steadily (the policy drifts away from the reference);
* ``margin_flat``: after the warm-up the reward margin stays at or below 0, or the held-out reward
  accuracy sits at chance;
* ``saturated``: the gradient norm collapses towards 0 while the loss stops moving (eq. 7's
  sigmoids saturated: no signal reaches the weights);
* ``kl_zero``: the KL estimate has been clamped at 0 for the whole run (the policy moved the
  mismatched completions down, so z_ref gives no reference point);
* ``single_class``: a micro-batch held rows of one class only;
* ``grad_spike``: the gradient norm jumps far above its recent median;
* ``router_collapse``: in a mixture-of-experts policy, one expert of a layer receives nearly every
  token, step after step (the router has collapsed onto a few experts; its balancing loss,
  ``kto.router_aux_coef``, is what counters it).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["HealthThresholds", "Finding", "RunSummary", "check_steps", "check_eval", "collapsed_layer", "HealthMonitor"]


@dataclass(frozen=True)
class HealthThresholds:
    window: int = 20  # steps each trend is measured over
    warmup_steps: int = 50  # margin and held-out accuracy are judged after this many steps
    reward_drop: float = 0.5  # both rewards fell by more than this over the window
    kl_rise: float = 5.0  # the KL estimate rose by more than this over the window
    chance_margin: float = 0.05  # held-out reward accuracy within this of 0.5 is chance
    grad_collapse: float = 0.01  # gradient norm below this fraction of its run maximum
    grad_spike: float = 10.0  # gradient norm above this multiple of its window median
    router_collapse: float = 0.9  # an expert's share of a step's tokens (router/layer{i}/load_max), every step
    every_steps: int = 50  # a symptom is reported at most once per this many steps


@dataclass(frozen=True)
class Finding:
    symptom: str
    message: str  # the symptom, the numbers and the fix to try, one line


@dataclass
class RunSummary:
    """What the whole-run checks need of every step so far, kept in constant memory: the step
    count, the peak gradient norm and the last ``window + 1`` of them, and whether every step's KL
    estimate was exactly 0."""

    window: int
    steps: int = 0
    peak_grad_norm: float = 0.0
    norms: deque = field(default=None)
    kl_all_zero: bool = True

    def __post_init__(self):
        if self.norms is None:
            self.norms = deque(maxlen=self.window + 1)

    def add(self, metrics: Mapping[str, float]) -> None:
        self.steps += 1
        norm = metrics.get("grad_norm")
        if norm is not None and not math.isnan(norm):
            self.peak_grad_norm = max(self.peak_grad_norm, float(norm))
            self.norms.append(float(norm))
        kl = metrics.get("kl")
        self.kl_all_zero = self.kl_all_zero and kl is not None and not math.isnan(kl) and float(kl) == 0.0

    @classmethod
    def of(cls, history: Sequence[Mapping[str, float]], window: int) -> "RunSummary":
        summary = cls(window)
        for metrics in history:
            summary.add(metrics)
        return summary


def _series(history: Sequence[Mapping[str, float]], key: str) -> list[float]:
    return [float(m[key]) for m in history if key in m and m[key] == m[key]]  # NaN-free


def _change(values: Sequence[float]) -> float:
    """Least-squares slope times span: how much ``values`` moved over their window, robust to noise."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den * (n - 1)


def collapsed_layer(recent: Sequence[Mapping[str, float]], threshold: float) -> tuple[str, float, float] | None:
    """The MoE layer whose busiest expert received at least ``threshold`` of the tokens in every step
    of ``recent`` while its idlest received less (with top-k = E every expert sees every token: no
    collapse), as (layer number, last load_max, last load_min), the highest last load_max of them;
    None when no layer qualifies (or the metrics hold no router loads)."""
    worst = None
    for key in recent[-1] if recent else ():
        if not (key.startswith("router/layer") and key.endswith("/load_max")):
            continue
        layer = key.split("/")[1]
        high, low = _series(recent, key), _series(recent, f"router/{layer}/load_min")
        if len(high) == len(low) == len(recent) and all(h >= threshold > lo for h, lo in zip(high, low)):
            if worst is None or high[-1] > worst[1]:
                worst = (layer.removeprefix("layer"), high[-1], low[-1])
    return worst


def check_steps(history: Sequence[Mapping[str, float]], t: HealthThresholds, *, step: int,
                single_class_micro_batches: int = 0, grad_clip: float = 0.0, kl_checks: bool = True,
                summary: RunSummary | None = None, router_aux_coef: float = 0.0) -> list[Finding]:
    """Findings from the step metrics so far (``history[-1]`` is step ``step``); ``grad_clip``: the
    run's optim.grad_clip, named in the spike warning; ``kl_checks``: the loss has a KL reference
    point (``kto.loss_type=kto``), so the KL trends mean something. ``summary``: the whole run's
    :class:`RunSummary`, when ``history`` holds only its last ``t.window`` steps (default: made
    from ``history``). ``router_aux_coef``: the run's kto.router_aux_coef, named in the router
    collapse warning."""
    out: list[Finding] = []
    run = summary or RunSummary.of(history, t.window)
    recent = history[-t.window:]
    full = len(recent) >= t.window
    chosen, rejected = _series(recent, "rewards/chosen"), _series(recent, "rewards/rejected")
    if full and len(chosen) == len(rejected) == t.window:
        dc, dr = _change(chosen), _change(rejected)
        if dc < -t.reward_drop and dr < -t.reward_drop:
            out.append(Finding("rewards_falling", (
                f"rewards of desirable and undesirable completions both fell over the last {t.window} steps "
                f"({chosen[0]:.3g} -> {chosen[-1]:.3g} and {rejected[0]:.3g} -> {rejected[-1]:.3g}): the policy is "
                "lowering every completion (likelihood displacement); lower optim.lr, raise kto.beta, or add "
                "kto.sft_weight")))
    kl = _series(recent, "kl")
    if kl_checks and full and len(kl) == t.window:
        rise = _change(kl)
        ups = sum(b > a for a, b in zip(kl, kl[1:]))
        if rise > t.kl_rise and ups >= 0.6 * (len(kl) - 1):
            out.append(Finding("kl_rising", (
                f"the KL estimate rose from {kl[0]:.3g} to {kl[-1]:.3g} over the last {t.window} steps: the policy is "
                "drifting away from the reference; lower optim.lr")))
    margins = _series(recent, "rewards/margins")
    if full and step >= t.warmup_steps and len(margins) == t.window and statistics.fmean(margins) <= 0:
        out.append(Finding("margin_flat", (
            f"the reward margin averaged {statistics.fmean(margins):.3g} over the last {t.window} steps, after "
            f"{step} steps: desirable completions are not gaining on undesirable ones; check the labels, "
            "kto.beta and optim.lr")))
    norms, losses = list(run.norms), _series(recent, "loss")
    if full and len(norms) >= t.window and len(losses) == t.window:
        top, last = run.peak_grad_norm, norms[-t.window:]
        if top > 0 and max(last) < t.grad_collapse * top and abs(_change(losses)) < 1e-3:
            out.append(Finding("saturated", (
                f"the gradient norm fell to {last[-1]:.3g} ({max(last) / top:.1%} of its peak {top:.3g}) while the "
                f"loss stayed at {losses[-1]:.4f}: the sigmoids of eq. (7) are saturated and no signal reaches "
                "the weights; lower optim.lr or kto.beta")))
    if kl_checks and step >= t.warmup_steps and run.steps >= t.warmup_steps and run.steps and run.kl_all_zero:
        # run.steps: the steps the summary saw (a resume from a checkpoint without them starts at the resume)
        out.append(Finding("kl_zero", (
            f"the KL estimate has been 0 (clamped) for all {step} steps: the policy gives the mismatched "
            "completions (other prompts' answers) less probability than the reference, so z_ref = 0 and KTO "
            "acts as apo_zero_unpaired; usual and harmless when the policy starts from an SFT model "
            "(docs/quality.md); if held-out reward accuracy stalls, lower optim.lr, or check that desirable "
            "and undesirable rows share prompts")))
    if single_class_micro_batches:
        out.append(Finding("single_class", (
            f"{single_class_micro_batches} micro-batch(es) of step {step} held rows of one class only: their "
            "z_ref and loss see one side; keep data.balanced_sampling on, or add rows of the rarer class")))
    if len(norms) > t.window and norms[-1] > 0:
        median = statistics.median(norms[-t.window - 1:-1])
        if median > 0 and norms[-1] > t.grad_spike * median:
            out.append(Finding("grad_spike", (
                f"the gradient norm jumped to {norms[-1]:.3g}, {norms[-1] / median:.0f}x its median {median:.3g} over "
                f"the previous {t.window} steps (optim.grad_clip={grad_clip:g} bounds the update); a bad row or too high "
                "a learning rate; look at this step's rows, or lower optim.lr")))
    collapsed = collapsed_layer(recent, t.router_collapse) if full else None
    if collapsed:
        layer, high, low = collapsed
        out.append(Finding("router_collapse", (
            f"router collapse: in MoE layer {layer} the busiest expert received {high:.0%} of the tokens (the idlest "
            f"{low:.0%}) in each of the last {t.window} steps: the router sends nearly every token to the same "
            f"experts; raise kto.router_aux_coef (now {router_aux_coef:g}) or lower optim.lr")))
    return out


def check_eval(history: Sequence[tuple[int, Mapping[str, float]]], t: HealthThresholds) -> list[Finding]:
    """Findings from the held-out metrics ``[(step, metrics), ...]``: accuracy at chance after the
    warm-up."""
    if not history:
        return []
    step, metrics = history[-1]
    acc = metrics.get("reward_accuracy")
    if step >= t.warmup_steps and acc is not None and abs(acc - 0.5) <= t.chance_margin:
        return [Finding("eval_chance", (
            f"held-out reward accuracy is {acc:.3f} at step {step}, chance level: the policy has not learned to "
            "prefer desirable completions; check the labels, kto.beta and optim.lr"))]
    return []


class HealthMonitor:
    """The last ``window`` steps, the run's :class:`RunSummary` (constant memory and time per step,
    however long the run) and when each symptom was last reported."""

    def __init__(self, thresholds: HealthThresholds, *, grad_clip: float = 0.0, kl_checks: bool = True,
                 router_aux_coef: float = 0.0):
        self.t = thresholds
        self.grad_clip, self.kl_checks, self.router_aux_coef = grad_clip, kl_checks, router_aux_coef
        self.history: deque[dict[str, float]] = deque(maxlen=thresholds.window)
        self.summary = RunSummary(thresholds.window)
        self._last: dict[str, int] = {}

    def _due(self, findings: list[Finding], step: int) -> list[str]:
        out = []
        for f in findings:
            last = self._last.get(f.symptom)
            if last is None or step - last >= self.t.every_steps:
                self._last[f.symptom] = step
                out.append(f.message)
        return out

    def step(self, step: int, metrics: Mapping[str, float], *, single_class_micro_batches: int = 0) -> list[str]:
        """Record step ``step``; the warning lines due now."""
        self.history.append(dict(metrics))
        self.summary.add(metrics)
        return self._due(check_steps(list(self.history), self.t, step=step, grad_clip=self.grad_clip,
                                     kl_checks=self.kl_checks, summary=self.summary,
                                     router_aux_coef=self.router_aux_coef,
                                     single_class_micro_batches=single_class_micro_batches), step)

    def evaluated(self, eval_history: Sequence[tuple[int, Mapping[str, float]]]) -> list[str]:
        return self._due(check_eval(eval_history, self.t), eval_history[-1][0]) if eval_history else []

    def state_dict(self) -> dict:
        """The window, the run's summary and the report times, as plain types (the trainer state):
        a resumed run judges its trends over the steps before the resume too."""
        s = self.summary
        return {"history": [dict(m) for m in self.history], "last": dict(self._last),
                "summary": {"steps": s.steps, "peak_grad_norm": s.peak_grad_norm, "norms": list(s.norms),
                            "kl_all_zero": s.kl_all_zero}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; a smaller ``health.window`` now keeps the newest steps."""
        self.history.clear()
        self.history.extend(dict(m) for m in state["history"])
        s = state["summary"]
        self.summary = RunSummary(self.t.window, steps=int(s["steps"]), peak_grad_norm=float(s["peak_grad_norm"]),
                                  kl_all_zero=bool(s["kl_all_zero"]))
        self.summary.norms.extend(float(n) for n in s["norms"])
        self._last = {k: int(v) for k, v in state["last"].items()}
