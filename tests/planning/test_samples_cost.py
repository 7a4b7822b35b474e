"""The planner's estimate of eval samples (megakto/planning/samples_cost.py) against hand-worked
cases, and its verdict for a model that does not fit on one device."""

import pytest

from megakto.planning.plan import GIB, PlanInputs, plan_memory
from megakto.planning.samples_cost import SAMPLES_SHARE, DeviceSpeed, SamplesWork, samples_cost
from tests.planning.test_plan import TOY

# Round speeds so the arithmetic is by hand: 1e9 FLOP/s, 1e8 bytes/s of memory, 1e7 of all-gather,
# 1 ms per layer and pass, 10 ms per module gathered, 1 ms per generated token.
SLOW = DeviceSpeed(flops=1e9, memory=1e8, gather=1e7, layer_s=1e-3, latency_s=1e-2, token_s=1e-3)
WORK = SamplesWork(prompts=3, prompt_tokens=10, new_tokens=20, models=2, step_tokens=4000, steps_between=10)


def _plan(stage: int, dp: int = 1, grad_accum: int = 1):
    return plan_memory(PlanInputs(shape=TOY, world_size=dp, dp=dp, grad_accum=grad_accum, zero={"stage": stage},
                                  weight_bytes=4, on_gpu=False))


def test_zero0_by_hand():
    """P = 202048, w = 4, L = 2. A pass over n tokens: max(2·P·n / 1e9, 4·P / 1e8) + 0.002.
    Samples per model: the prefill of 3·10 tokens (12.12288 ms + 2 ms) and 20 passes of 3 tokens
    (weights read: 8.08192 ms + 2 ms + 1 ms a token): 14.12288 + 221.6384 = 235.76128 ms; two models:
    0.47152256 s. A step, one rank, one micro-batch, T = 4000: passes of 2·T, T, T, 2·T tokens:
    2·P·6·T / 1e9 = 9.698304 s plus 4·2 ms = 9.706304 s; 10 steps: 97.06304 s."""
    cost = samples_cost(_plan(0), WORK, device_bytes=None, speed=SLOW)
    assert cost.seconds == pytest.approx(0.47152256, rel=1e-12)
    assert cost.steps_seconds == pytest.approx(97.06304, rel=1e-12)
    assert cost.fits and cost.share == pytest.approx(0.47152256 / 97.06304)
    assert cost.share < SAMPLES_SHARE and cost.default_on


def test_zero3_gathers_once_per_call_when_it_fits_else_every_forward():
    """A ZeRO-3 gather moves 4·P / 1e7 s = 80.8192 ms: once per model and call when the model fits,
    with one latency (0.47152256 + 2·0.0908192 s); in each of its 21 passes when it does not, with a
    latency per module, L + 2 = 4 (+ 2·21·0.1208192 s)."""
    plan = _plan(3)
    fits = samples_cost(plan, WORK, device_bytes=64 * GIB, speed=SLOW)
    assert fits.fits and fits.seconds == pytest.approx(0.47152256 + 2 * 0.0908192, rel=1e-12)
    tight = samples_cost(plan, WORK, device_bytes=plan.peak_bytes_per_rank, speed=SLOW)  # no room for a copy
    assert not tight.fits and not tight.default_on
    assert tight.seconds == pytest.approx(0.47152256 + 2 * 21 * 0.1208192, rel=1e-12)
    assert "does not fit" in tight.why_not_gathered()


def test_share_counts_the_steps_between_evaluations():
    """Half the steps between evaluations: twice the share."""
    plan = _plan(0)
    every10 = samples_cost(plan, WORK, device_bytes=None, speed=SLOW)
    every5 = samples_cost(plan, SamplesWork(**{**WORK.__dict__, "steps_between": 5}), device_bytes=None, speed=SLOW)
    assert every5.share == pytest.approx(2 * every10.share)
