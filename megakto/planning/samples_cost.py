"""What a run's eval samples cost, before it runs: whether the gathered model fits on one device,
and the seconds of greedy generation per evaluation against the seconds of training between two
evaluations. The trainer turns samples on by default only where that share is under
:data:`SAMPLES_SHARE` (megakto/samples.py).

A roofline estimate, per rank, over a :class:`~megakto.planning.plan.PlanInputs` (``P``
parameters of ``w`` bytes, ``L`` layers):

* one pass over ``n`` tokens costs ``max(2·P·n / flops, w·P / memory)`` (compute, or reading every
  weight once: a decode step of a few prompts is the second), plus ``L`` times a fixed per-layer
  cost (kernel launches, Python), plus under ZeRO-3 the all-gather of every weight (``w·P / gather``
  and a latency per module: ``L + 2`` of them) unless the weights were gathered once for the call;
* the samples: per generating model a prefill of the prompts and one pass per new token, the
  prompts batched, each token with a fixed cost of ``generate``'s loop (``token_s``);
* a training step: the rank's share ``T`` of the step's tokens, in ``grad_accum`` micro-batches, in
  four passes each gathering every weight under ZeRO-3: the reference (target and KL rows, 2·T),
  the policy without grad (KL rows, T), with grad (T) and its backward (twice a forward's work).

The device speeds (:data:`CPU`, :data:`GPU`) are round figures, not measurements of this machine:
the estimate decides a default; the run logs the measured time of every evaluation and its share.
"""

from __future__ import annotations

from dataclasses import dataclass

from megakto.planning.plan import GIB, GPU_HEADROOM, MemoryPlan

__all__ = ["SAMPLES_SHARE", "DeviceSpeed", "CPU", "GPU", "SamplesWork", "SamplesCost", "samples_cost"]

# "A few percent": eval samples are on by default when they cost less than this share of the training
# between two evaluations.
SAMPLES_SHARE = 0.03


@dataclass(frozen=True)
class DeviceSpeed:
    flops: float       # sustained multiply-adds x 2 per second
    memory: float      # bytes per second read from the device's memory
    gather: float      # bytes per second a rank receives in ZeRO-3's all-gather
    layer_s: float     # fixed seconds per layer and pass (launches, Python)
    latency_s: float   # fixed seconds per module gathered by ZeRO-3
    token_s: float     # fixed seconds per generated token (generate's loop, its per-token all-reduce)


# A 2-core CPU over gloo (the machine the tests run on; the fixed costs from the demo model: 0.2 s a
# step, 0.27 s for 3 samples of 24 tokens from 2 models), and a data-centre GPU over NVLink/InfiniBand.
CPU = DeviceSpeed(flops=3e10, memory=1e10, gather=1e9, layer_s=1e-3, latency_s=5e-3, token_s=3e-3)
GPU = DeviceSpeed(flops=3e14, memory=2e12, gather=5e10, layer_s=1e-4, latency_s=1e-4, token_s=1e-3)


@dataclass(frozen=True)
class SamplesWork:
    """What the samples generate and what the run trains between two evaluations."""

    prompts: int
    prompt_tokens: int      # the longest sample prompt
    new_tokens: int         # train.sample_max_new_tokens
    models: int             # 2: policy and reference; 1: a cached reference (no model)
    step_tokens: int        # tokens of one global batch (prompt + completion of its rows)
    steps_between: int      # train.eval_every, or train.max_steps when only the final evaluation runs


@dataclass(frozen=True)
class SamplesCost:
    seconds: float           # the samples of one evaluation
    steps_seconds: float     # the training between two evaluations
    fits: bool               # the whole model gathered on one device beside the run's peak
    gathered_gib: float      # what that copy takes
    peak_gib: float          # the run's planned peak per rank
    device_gib: float | None

    @property
    def share(self) -> float:
        return self.seconds / self.steps_seconds if self.steps_seconds else float("inf")

    @property
    def default_on(self) -> bool:
        return self.fits and self.share < SAMPLES_SHARE

    def describe(self) -> str:
        """``~0.4 s per evaluation, 1.2% of the ~35 s of training between evaluations``"""
        return (f"~{self.seconds:.2g} s per evaluation, {100 * self.share:.2g}% of the ~{self.steps_seconds:.3g} s "
                "of training between evaluations (planner estimate)")

    def why_not_gathered(self) -> str:
        room = f" of {self.device_gib:.3g} GiB" if self.device_gib is not None else ""
        return (f"the model gathered on one device ({self.gathered_gib:.3g} GiB beside the run's "
                f"{self.peak_gib:.3g} GiB{room}) does not fit, so every generated token would gather every layer")


def _gather(p: MemoryPlan, speed: DeviceSpeed, modules: int) -> float:
    return p.inputs.weight_bytes * p.params["per rank (tp/pp shard)"] / speed.gather + modules * speed.latency_s


def _forward(p: MemoryPlan, n_tokens: int, speed: DeviceSpeed, *, gathers: bool) -> float:
    inputs, params = p.inputs, p.params["per rank (tp/pp shard)"]
    layers = inputs.shape.layers
    s = max(2 * params * n_tokens / speed.flops, inputs.weight_bytes * params / speed.memory) + layers * speed.layer_s
    return s + (_gather(p, speed, layers + 2) if gathers else 0.0)


def samples_cost(plan: MemoryPlan, work: SamplesWork, *, device_bytes: int | None,
                 speed: DeviceSpeed | None = None) -> SamplesCost:
    """The samples' cost under ``plan`` (its inputs: the model, ZeRO stage, data-parallel size and
    micro-batches); ``device_bytes``: one device's memory (None: unknown, taken to fit)."""
    inputs = plan.inputs
    speed = speed or (GPU if inputs.on_gpu else CPU)
    stage3 = int(inputs.zero.get("stage", 0)) == 3
    params = plan.params["per rank (tp/pp shard)"]
    gathered = inputs.weight_bytes * params
    peak = plan.peak_bytes_per_rank
    fits = device_bytes is None or peak + gathered <= device_bytes * (1 - GPU_HEADROOM)
    per_model = _forward(plan, work.prompts * work.prompt_tokens, speed, gathers=stage3 and not fits)
    per_model += work.new_tokens * (_forward(plan, work.prompts, speed, gathers=stage3 and not fits) + speed.token_s)
    if stage3 and fits:
        per_model += _gather(plan, speed, 1)  # once per call
    tokens = work.step_tokens / max(1, inputs.dp)
    micro = max(1, inputs.grad_accum)
    # Per micro-batch: reference (2·T), policy without grad (T), with grad (T), backward (2·T of work).
    step = sum(_forward(plan, round(k * tokens / micro), speed, gathers=stage3) for k in (2, 1, 1, 2)) * micro
    return SamplesCost(seconds=work.models * per_model, steps_seconds=step * work.steps_between, fits=fits,
                       gathered_gib=gathered / GIB, peak_gib=peak / GIB,
                       device_gib=None if device_bytes is None else device_bytes / GIB)
