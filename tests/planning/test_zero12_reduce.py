"""ZeRO-1/2's bucket reduction in the train phase, and the head's gradient counted once, against hand
arithmetic (DeepSpeed 0.19.8 stage_1_and_2.py; measured with tools/memory_timeline.py --rss, see
megakto/planning/plan.py). TOY: P = 202048, vocabulary 1000 x hidden 64, its largest parameter the
64000-element head."""

import pytest

from megakto.planning.activations import Tokens, logits_bytes, train_pass
from megakto.planning.plan import PlanInputs, plan_memory

from tests.planning.test_plan import TOY

P = 202048
TOKENS = Tokens(256, 100, 2, 128)


def _plan(stage, *, dp=2, world=2, on_gpu=True, pp=1, w=4, **zero):
    return plan_memory(PlanInputs(shape=TOY, world_size=world, dp=dp, pp=pp,
                                  zero={"stage": stage, "reduce_bucket_size": 1000, "overlap_comm": True, **zero},
                                  weight_bytes=w, on_gpu=on_gpu, ref="none", ref_offload=False,
                                  train_tokens=TOKENS, precompute_tokens=TOKENS))


def test_stage_2_reduces_one_ranks_share_at_a_time():
    """Stage 2, dp 2: the share in flight is min(reduce_bucket_size, P/2) = min(1000, 101024) elements,
    4·1000 bytes in fp32; the partition is the stage's gradient row, not a train-phase term."""
    assert _plan(2).details["train"] == {"ZeRO-1/2 reduce share in flight": 4000}
    # a bucket larger than the share: the share, 4·101024
    assert _plan(2, reduce_bucket_size=10**9).details["train"] == {
        "ZeRO-1/2 reduce share in flight": 4 * 101024}


def test_stage_1_copies_its_partition_out_of_the_bucket():
    """Stage 1 with contiguous gradients also copies this rank's partition (P/2 = 101024 elements)
    out of the reduced bucket: 4·101024 = 404096 bytes; without contiguous gradients it does not."""
    assert _plan(1).details["train"] == {"ZeRO-1/2 reduce share in flight": 4000,
                                         "ZeRO-1 partition copy": 404096}
    assert _plan(1, contiguous_gradients=False).details["train"] == {
        "ZeRO-1/2 reduce share in flight": 4000}


def test_bf16_stage_1_reduces_in_bf16_and_offload_copies_to_the_host():
    """bf16 ZeRO-1 sums its gradients in bf16 (megakto fills an fp32 sum for ZeRO-3 only): the share
    2·1000 and the partition copy 2·101024 bytes. Under optimizer offload the partition goes to the
    host's fp32 copy instead: no device copy."""
    assert _plan(1, w=2).details["train"] == {"ZeRO-1/2 reduce share in flight": 2000,
                                              "ZeRO-1 partition copy": 2 * 101024}
    assert _plan(1, w=2, offload_optimizer={"device": "cpu"}).details["train"] == {
        "ZeRO-1/2 reduce share in flight": 2000}


def test_one_data_parallel_rank_exchanges_nothing():
    """dp 1 (here a 2-stage pipeline on 2 ranks, stage 1 of 101024 + ... parameters): no share in flight,
    the partition (the whole stage) copied out: measured +128 MiB for a 33.5M fp32 stage."""
    plan = _plan(1, dp=1, pp=2)
    stage_params = plan.params["per rank (tp/pp shard)"]
    assert plan.details["train"] == {"ZeRO-1 partition copy": 4 * stage_params}


def test_stage_1_buckets_on_cpu_are_the_gradients_pages():
    """On CPU a bucket's resident pages are the gradients copied into it (each gradient's own tensor is
    freed), already counted as the whole .grad (4·P): the bucket row is 0 there, 2·1000·4 on a GPU
    (both allocated whole with overlap_comm)."""
    cpu = {name: device for name, device, _ in _plan(1, on_gpu=False).rows}
    gpu = {name: device for name, device, _ in _plan(1).rows}
    assert cpu["ZeRO buckets"] == 0 and gpu["ZeRO buckets"] == 2 * 1000 * 4
    assert cpu["policy gradients"] == gpu["policy gradients"] == 4 * P


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_head_gradient_is_the_largest_parameters_gradient_once(stage):
    """Without vocabulary blocks the head block's gradient is the head's own (64000 elements, the
    largest parameter): 4·64000 bytes counted once, not beside a second "largest gradient" term. So the
    train phase is the activations, the backward's layer, the head with its gradient, and per stage:
    ZeRO-3's gathered weights (min(5e7 + 64000, 1e9, P) = P elements, 4·P) or ZeRO-1/2's reduce terms."""
    plan = _plan(stage)
    head = {g: logits_bytes(TOY, TOKENS.completion, w=4, tp=1, logps="chunked", chunk_tokens=None, block_rows=0, grad=g)
            for g in (False, True)}
    assert head[True] - head[False] == 4 * 64000  # the head's gradient: 4·1000·64
    layers = train_pass(TOY, TOKENS, w=4, tp=1, checkpointing=False, attn="sdpa")
    per_stage = 4 * P if stage == 3 else sum(plan.details["train"].values())
    assert plan.phases["train"] == layers["activations"] + layers["backward"] + head[True] + per_stage
