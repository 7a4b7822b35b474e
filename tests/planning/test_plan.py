"""The memory planner's arithmetic against hand-worked cases (the arithmetic in each docstring)."""

import doctest

import pytest

from megakto.planning import activations, plan as plan_mod, states
from megakto.planning.activations import Tokens, layer_bytes_per_token
from megakto.planning.plan import PlanInputs, plan_memory, worst_case_tokens
from megakto.model.shape import ModelShape
from megakto.planning.states import model_states

# A Llama-shaped toy: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 kv heads, vocab 1000, untied.
# One layer: q 64·64 + k 64·32 + v 64·32 + o 64·64 + gate/up/down 3·64·128 + 2 norms of 64
#          = 4096 + 2048 + 2048 + 4096 + 24576 + 128 = 36992; P = 2·36992 + 2·64000 + 64 = 202048.
TOY = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=1000,
                 embedding=64000, head=64000, layer_params=(4096, 2048, 2048, 4096, 8192, 8192, 8192, 64, 64),
                 other_params=(64,))


def test_docstring_cases():
    for module in (states, activations, plan_mod):
        failed, tried = doctest.testmod(module)
        assert tried > 0 and failed == 0, module.__name__


def test_toy_shape_counts():
    """202048 parameters, as the demo's tiny Llama (tests/_demo) has at hidden 64."""
    assert TOY.total == 202048 and TOY.per_layer == 36992 and TOY.largest_layer_param() == 8192


@pytest.mark.parametrize("stage,w,expected", [
    # ZeRO-3 bf16 + fp32 Adam: (2 + 2 + 4 + 8)·P/N = 16·P/N; P = 1,000,000, N = 8 -> 2,000,000.
    (3, 2, 2_000_000),
    # ZeRO-2 bf16: 2P whole weights + (2 + 4 + 8)·P/N = 2,000,000 + 1,750,000.
    (2, 2, 3_750_000),
    # ZeRO-1 bf16: 2P weights + 2P gradients + 12·P/N = 4,000,000 + 1,500,000.
    (1, 2, 5_500_000),
    # ZeRO-3 fp32 (CPU): (4 + 4 + 4 + 8)·P/N = 20·P/N.
    (3, 4, 2_500_000),
])
def test_model_states_per_stage(stage, w, expected):
    assert model_states(1_000_000, 0, stage=stage, shards=8, weight_bytes=w).device == expected


def test_offload_moves_master_moments_and_gradients_to_the_host():
    """ZeRO-3 bf16 + offload_optimizer over 8 ranks, P = 1,000,000, P/8 = 125,000: the device keeps the
    weight partition 2·125,000 = 250,000; the host the master and moments (4 + 8)·125,000 = 1,500,000,
    the sub-groups' fp32 gradients 4·125,000 = 500,000 and the bf16 accumulation partition
    (grad_partitions_flat_buffer, made on the host under offload) 2·125,000 = 250,000: 2,250,000.
    With offload_param the weight partition moves too: 0 and 2,500,000."""
    s = model_states(1_000_000, 0, stage=3, shards=8, weight_bytes=2, offload_optimizer=True)
    assert (s.device, s.host) == (250_000, 2_250_000)
    assert (s.host_gradients, s.host_master, s.host_optimizer) == (750_000, 500_000, 1_000_000)
    both = model_states(1_000_000, 0, stage=3, shards=8, weight_bytes=2, offload_optimizer=True, offload_param=True)
    assert (both.device, both.host) == (0, 2_500_000)


def test_zero3_offload_calibration_model_by_hand():
    """The calibration's zero3-offload-opt model: P = 63,972,352 in fp32 over 2 ranks, P/2 = 31,986,176.
    Host: master 4, moments 8, fp32 sub-group gradients 4 and the fp32 accumulation partition 4 bytes
    each: 20·31,986,176 = 639,723,520 (610 MiB); the device (here the same memory) 4·P/2 = 127,944,704."""
    s = model_states(63_972_352, 0, stage=3, shards=2, weight_bytes=4, offload_optimizer=True)
    assert (s.device, s.host) == (127_944_704, 639_723_520)


def test_zero2_offload_keeps_a_bit16_weight_partition_on_the_host():
    """ZeRO-2 bf16 + offload over 8 ranks, P/8 = 125,000: device 2P whole weights = 2,000,000; host
    fp32 master 500,000, moments 1,000,000, fp32 gradient 500,000 and the bf16 staging copy of the
    weight partition 250,000 = 2,250,000."""
    s = model_states(1_000_000, 0, stage=2, shards=8, weight_bytes=2, offload_optimizer=True)
    assert (s.device, s.host, s.host_weights) == (2_000_000, 2_250_000, 250_000)


def test_lora_states_count_adapters_only():
    """Frozen base weights (ZeRO-3: 2·P/N) and 16 bytes per adapter parameter over N."""
    s = model_states(1000, 1_000_000, stage=3, shards=4, weight_bytes=2)
    assert s.device == 2 * 1000 // 4 + 2 * 1_000_000 // 4 + (2 + 4 + 8) * 1000 // 4


def test_deepspeed_estimator_is_ours_plus_its_whole_fp32_gradient():
    """DeepSpeed's estimate for ZeRO-3 without offload is 18·P/N + 4·largest layer: our 16·P/N, its
    fp32 gradient of the whole partition (2·P/N more than the 2 bytes we hold between steps plus
    one sub-group's fp32 gradient at the step) and a gathered largest layer with its gradient."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    p, n, largest = 32_763_876_352, 32, 141_557_760
    _, gpu, _ = estimate_zero3_model_states_mem_needs(p, largest, num_gpus_per_node=8, num_nodes=4,
                                                      cpu_offload=False, cpu_offload_params=False)
    ours = model_states(p, 0, stage=3, shards=n, weight_bytes=2).device
    assert gpu == 4 * largest + int(18 * p / n)
    assert gpu - ours == pytest.approx(4 * largest + 2 * p / n, rel=1e-9)


def test_layer_activations_by_hand():
    """Qwen2.5-32B's layer (h 5120, q 5120, kv 1024, i 27648) in bf16: norms 2·8·5120 = 81920 bytes,
    the rest 2·(5·5120 + 4·1024 + 4·27648) = 2·(25600 + 4096 + 110592) = 280576: 362496 bytes per token;
    TP8 divides all but the norms: 81920 + 280576 / 8 = 116992."""
    qwen = ModelShape(hidden=5120, intermediate=27648, layers=64, heads=40, kv_heads=8, head_dim=128,
                      vocab=152064, embedding=1, head=1, layer_params=(1,))
    assert layer_bytes_per_token(qwen, w=2) == 362496
    assert layer_bytes_per_token(qwen, w=2, tp=8) == 116992


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    """1000 tokens, toy in fp32 (layer 5376 bytes a token): without checkpointing 2 layers keep
    2·5376·1000; with it each layer keeps its input (64·4 bytes a token) and one layer is recomputed."""
    t = Tokens(1000, 100, 1, 1000)
    off = activations.train_pass(TOY, t, w=4, tp=1, checkpointing=False, attn="sdpa")
    on = activations.train_pass(TOY, t, w=4, tp=1, checkpointing=True, attn="sdpa")
    rest = 3 * 64 * 4 * 1000 + 64 * 4 * 100 + 1000 * 1000  # final norm, scored hidden states, the mask
    assert off["activations"] == 2 * 5376 * 1000 + rest
    assert on["activations"] == 2 * 64 * 4 * 1000 + 5376 * 1000 + rest


def test_worst_case_tokens():
    """4 rows of 64 tokens packed into rows of 128: 2 rows of 128; unpacked: 4 rows of 64."""
    assert worst_case_tokens(4, 64, 128, True) == Tokens(256, 256, 2, 128)
    assert worst_case_tokens(4, 64, 64, False) == Tokens(256, 256, 4, 64)


def test_plan_peak_is_persistent_plus_largest_phase():
    p = PlanInputs(shape=TOY, world_size=2, dp=2, zero={"stage": 3, "reduce_bucket_size": 1000},
                   weight_bytes=4, on_gpu=True, ref="online", ref_offload=False,
                   train_tokens=Tokens(256, 100, 2, 128), precompute_tokens=Tokens(256, 100, 2, 128))
    plan = plan_memory(p, gpu_memory=1.0)
    # policy 20·P/2, reference weights 4·P/2 on the device, the 1000-element bucket in fp32. The
    # reference forwards' gathered weights (all P of them: under stage3_max_live_parameters) 4·P and
    # the flat buffers of two 5e7-element prefetch buckets (capped at P) 4·P are no longer persistent:
    # measured, they are released after each reference pass (docs/planning.md), so they belong to
    # the no-grad phase.
    states_bytes = 20 * 202048 // 2 + 4 * 202048 // 2
    assert plan.persistent == pytest.approx(states_bytes + 1000 * 4, abs=64)
    assert plan.details["no-grad"] == {"reference gathered bucket copies": 4 * 202048,
                                       "reference prefetch buffers": 4 * 202048}
    assert plan.phases["no-grad"] >= 8 * 202048
    assert plan.device_peak == plan.persistent + max(plan.phases.values())
    assert plan.fits is True and plan.host_bytes_per_node == 0


@pytest.mark.parametrize("stage, weight_bytes, zero, want", [
    (1, 2, {}, 2 * 1000 * 2),                            # ZeRO-1 bf16: two buckets in the gradient-sum dtype, bf16
    (2, 2, {}, 2 * 1000 * 2),                            # ZeRO-2 bf16: two buckets in the model dtype
    (1, 4, {"overlap_comm": False}, 1000 * 4),           # one bucket without overlap_comm
    (1, 2, {"contiguous_gradients": False}, 0),          # no contiguous buffers, no buckets
])
def test_zero_1_and_2_reduce_buckets(stage, weight_bytes, zero, want):
    """DeepSpeed's stage_1_and_2.setup_buckets: reduce_bucket_size (1000) elements, twice with
    overlap_comm, in the gradient-sum dtype (_gradient_reduction_buffer_dtype, 1253): the model's,
    which megakto leaves ZeRO-1/2 in (an fp32 sum is filled for ZeRO-3 only)."""
    p = PlanInputs(shape=TOY, world_size=2, dp=2, zero={"stage": stage, "reduce_bucket_size": 1000,
                                                        "overlap_comm": True, **zero},
                   weight_bytes=weight_bytes, on_gpu=True, ref="none", ref_offload=False,
                   train_tokens=Tokens(256, 100, 2, 128), precompute_tokens=Tokens(256, 100, 2, 128))
    rows = {name: device for name, device, _ in plan_memory(p, gpu_memory=1.0).rows}
    assert rows["ZeRO buckets"] == want


@pytest.mark.parametrize("stage, grads, partition", [
    (1, 2 * 202048, 2 * 101024),  # ZeRO-1 bf16: the whole .grad 2·P; the step reads its partition 2·P/2
    (2, 2 * 101024, 2 * 101024),  # ZeRO-2 bf16: the gradient partition 2·P/2 from backward to step
])
def test_zero_1_and_2_gradients_and_buckets_live_from_backward_to_step(stage, grads, partition):
    """DeepSpeed 0.19.8's ZeRO-1/2 make their reduce buckets at a backward's first gradient hook and free
    them, and every .grad but the partition's, in that backward's epilogue; the step frees the rest and
    zero_grad(set_to_none=True) leaves nothing. Measured (tools/memory_timeline.py, ZeRO-1, 2 ranks,
    hidden 512): 443 MiB reachable after each step, the weights, master and moments only. So the
    table's gradients and buckets (two 1000-element buckets with overlap_comm, 2·1000·a bytes) count in
    the train phase, not in the no-grad passes or the precompute, which come before a backward, and the
    step holds the partition only. P = 202048 over 2 ranks: 101024 each; the step's fp32 cast 4·101024."""
    p = PlanInputs(shape=TOY, world_size=2, dp=2, zero={"stage": stage, "reduce_bucket_size": 1000,
                                                        "overlap_comm": True},
                   weight_bytes=2, on_gpu=True, ref="cache", ref_offload=False,
                   train_tokens=Tokens(256, 100, 2, 128), precompute_tokens=Tokens(256, 100, 2, 128))
    buckets = 2 * 1000 * 2  # bf16 at either stage: the gradient-sum dtype megakto leaves them in
    plan = plan_memory(p, gpu_memory=1.0)
    rows = {name: device for name, device, _ in plan.rows}
    assert rows["policy gradients"] == grads and rows["ZeRO buckets"] == buckets
    freed = {"gradients (backward to step)": -grads,
             "ZeRO buckets (backward only)": -buckets}
    assert plan.details["no-grad"] == freed
    assert {k: plan.details["precompute"][k] for k in freed} == freed
    assert plan.details["precompute"]["Adam moments, made at the first step"] == -8 * 101024
    assert plan.phases["step"] == 4 * 101024 - buckets - (grads - partition)
    assert plan.details["step"] == {k: -v for k, v in {"ZeRO buckets (backward only)": buckets,
                                                       "gradients beyond the partition": grads - partition}.items() if v}
    # the train phase still sees them: the peak is persistent (with both) plus the train phase
    assert plan.peak_phase == "train" and plan.device_peak == plan.persistent + plan.phases["train"]
