"""The ZeRO-3 gather terms of the no-grad and precompute phases against hand arithmetic (DeepSpeed
0.19.8's prefetch, flat buffers and per-parameter copies: megakto/planning/states.py
``zero3_forward_gathers``; docs/planning.md "Where the ZeRO-3 peak goes")."""

import pytest

from megakto.planning.activations import Tokens, logits_bytes, no_grad_pass
from megakto.planning.plan import PlanInputs, plan_memory
from megakto.planning.states import zero3_forward_gathers

from tests.planning.test_plan import TOY  # P = 202048

P = 202048
TOKENS = Tokens(256, 100, 2, 128)


def _plan(ref: str, *, zero=None, ref_zero=None, on_gpu=True, **kw):
    return plan_memory(PlanInputs(shape=TOY, world_size=2, dp=2, zero={"stage": 3, "reduce_bucket_size": 1000, **(zero or {})},
                                  ref_zero=ref_zero or {}, weight_bytes=4, on_gpu=on_gpu, ref=ref, ref_offload=False,
                                  train_tokens=TOKENS, precompute_tokens=TOKENS, **kw))


def test_calibration_model_at_deepspeeds_defaults():
    """The calibration's 64M Llama (P = 63,972,352, fp32) at the reference's defaults (bucket 5e7,
    max_live 1e9): buffers of the whole model in flight, 4·P = 255,889,408 bytes, and the first
    bucket's copies 4·5e7 = 200,000,000 (measured: 63.97M + 52.69M elements; the bucket ends on a
    parameter boundary)."""
    assert zero3_forward_gathers(63_972_352, weight_bytes=4, prefetch_bucket=50_000_000,
                                  max_live=1_000_000_000) == (200_000_000, 255_889_408)
    # max_live 1e7 with a 1e7 bucket: 4·1e7 copies, 4·(1e7 + 1e7) buffers (measured 22.3M together)
    assert zero3_forward_gathers(63_972_352, weight_bytes=4, prefetch_bucket=10_000_000,
                                  max_live=10_000_000) == (40_000_000, 80_000_000)


def test_reference_engine_prefetch_settings_reach_the_plan():
    """The reference's own zero section sizes its terms: a 1000-element bucket and max_live 5000 give
    4·1000 bytes of copies and 4·(5000 + 1000) of buffers; the policy's settings do not enter."""
    plan = _plan("online", zero={"stage3_prefetch_bucket_size": 7, "stage3_max_live_parameters": 9},
                 ref_zero={"stage3_prefetch_bucket_size": 1000, "stage3_max_live_parameters": 5000})
    assert plan.details["no-grad"] == {"reference gathered bucket copies": 4000,
                                       "reference prefetch buffers": 24000}


def test_no_grad_phase_counts_the_larger_of_the_two_passes_gathers():
    """The reference's pass and the policy's KL pass never overlap, and a ZeRO-3 policy prefetches as
    the reference does. Policy at bucket 1000, max_live 1000: copies 4·1000 + buffers 4·(1000 + 1000)
    = 12000 bytes; the reference at DeepSpeed's defaults 4·P copies + 4·P buffers = 8·P. With the
    reference the phase holds 8·P, not 8·P + 12000: 8·P - 12000 more than without one."""
    policy = {"stage3_prefetch_bucket_size": 1000, "stage3_max_live_parameters": 1000}
    online, none = _plan("online", zero=policy), _plan("none", zero=policy)
    assert online.phases["no-grad"] - none.phases["no-grad"] == 8 * P - 12000
    # A reference of bucket 500, max_live 500: 4·500 + 4·1000 = 6000 < 12000, the policy's count.
    small = _plan("online", zero=policy, ref_zero={"stage3_prefetch_bucket_size": 500, "stage3_max_live_parameters": 500})
    assert small.phases["no-grad"] == none.phases["no-grad"]
    assert small.details["no-grad"] == {"policy KL-pass gathers (ZeRO-3)": 12000}
    # At DeepSpeed's defaults the policy's own pass is as large as the reference's: 8·P either way.
    assert _plan("online").phases["no-grad"] == _plan("none").phases["no-grad"]


@pytest.mark.parametrize("on_gpu", [True, False])
def test_precompute_runs_before_adams_moments_exist(on_gpu):
    """torch's AdamW makes its moments at the first step, after the precompute: the precompute phase
    is the reference partition 4·P/2, its forwards' copies and buffers 4·P + 4·P and activations, less
    the moments 8·P/2 = 808192 bytes (fp32, 2 ranks). ZeRO-3 with a reference cache."""
    cache = _plan("cache", on_gpu=on_gpu)
    moments = 8 * P // 2
    assert cache.details["precompute"] == {"reference gathered bucket copies": 4 * P,
                                           "reference prefetch buffers": 4 * P,
                                           "Adam moments, made at the first step": -moments}
    forwards = no_grad_pass(TOY, TOKENS, w=4, tp=1, attn="sdpa") + logits_bytes(
        TOY, TOKENS.completion, w=4, tp=1, logps="chunked", chunk_tokens=None, block_rows=0, grad=False)
    assert cache.phases["precompute"] == 4 * P // 2 + forwards + 8 * P - moments
    # Under optimizer offload on a GPU the moments are on the host: nothing to take from the device.
    off = _plan("cache", zero={"offload_optimizer": {"device": "cpu"}}, on_gpu=True)
    assert "Adam moments, made at the first step" not in off.details["precompute"]
    assert off.phases["precompute"] == cache.phases["precompute"] + moments
