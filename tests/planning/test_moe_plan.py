"""The planner's mixture-of-experts terms against hand-worked cases (the arithmetic in each
docstring): the expert/dense split and EP's sharding of expert states, the MoE block's activations,
EP's all-to-all buffers and ZeRO-3's gather of a whole MoE block."""

import doctest
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from megakto.model.meta import model_shape, shape_of
from megakto.model.shape import ModelShape, MoeShape
from megakto.planning import moe
from megakto.planning.activations import Tokens, no_grad_pass, train_pass
from megakto.planning.plan import PlanInputs, plan_memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A Qwen3-MoE-shaped toy: hidden 32, 2 heads of 16 (q 32), 1 kv head (kv 16), 2 layers, both MoE with
# 8 experts of width 16, top-2, vocabulary 64, untied. One layer: q 32·32 = 1024, k 512, v 512, o 1024,
# 2 norms of 32, router 8·32 = 256, experts gate_up 8·(2·16)·32 = 8192 and down 8·32·16 = 4096:
# 15680. P = 2·15680 + 2·2048 + 32 = 35488; E = 2·(8192 + 4096) = 24576 experts, 10912 dense.
MOE = MoeShape(experts=8, top_k=2, expert_intermediate=16, layers=2, expert_params=(8192, 4096), block_params=256)
TOY = ModelShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, head_dim=16, vocab=64, embedding=2048,
                 head=2048, layer_params=(1024, 512, 512, 1024, 32, 32, 256, 8192, 4096), other_params=(32,), moe=MOE)
T = Tokens(100, 100, 1, 100)


def _plan(stage, world, ep, **kw):
    return plan_memory(PlanInputs(shape=TOY, world_size=world, dp=world, ep=ep, zero={"stage": stage},
                                  weight_bytes=2, accum_bytes=4 if stage == 3 else 2, ref="none",
                                  train_tokens=T, precompute_tokens=T, **kw))


def _rows(plan):
    return {name: (d, h) for name, d, h in plan.rows}


def test_docstring_cases():
    failed, tried = doctest.testmod(moe)
    assert tried > 0 and failed == 0


def test_toy_counts():
    """The largest dense tensor is q/o (1024): the fused experts (8192) are gathered as a block."""
    assert TOY.total == 35488 and TOY.expert_total == 24576 and TOY.largest_layer_param() == 1024


def test_zero3_under_ep_shards_experts_over_the_expert_data_parallel_group():
    """World 4, ep 2, ZeRO-3 bf16 with fp32 gradient sums (18 bytes a parameter). Dense: 10912 over
    4 ranks = 2728 each: weights 2·2728 = 5456, gradients 4·2728 = 10912, master 10912, Adam 21824.
    Experts: 24576 / 2 = 12288 per rank, over the 4 / 2 = 2 ranks holding the same experts = 6144:
    weights 12288, gradients 24576, master 24576, Adam 49152."""
    rows = _rows(_plan(3, 4, 2))
    assert rows["policy weights (dense)"] == (5456, 0) and rows["policy weights (experts 4/8)"] == (12288, 0)
    assert rows["policy gradients (dense)"] == (10912, 0) and rows["policy gradients (experts 4/8)"] == (24576, 0)
    assert rows["fp32 master weights (experts 4/8)"] == (24576, 0)
    assert rows["Adam moments (fp32) (dense)"] == (21824, 0) and rows["Adam moments (fp32) (experts 4/8)"] == (49152, 0)


def test_zero2_holds_one_ep_share_of_the_expert_weights():
    """ZeRO-2 keeps whole weights: plain (ep 1, world 4) 2·24576 = 49152 bytes of experts per rank,
    ep 2 only its 12288 experts: 24576; the gradient partitions are the same, 2·24576/4 = 12288 =
    2·12288/2. The step casts both groups' partitions to fp32: ep 2, 4·(2728 + 6144) = 35488; the
    reduce bucket (DeepSpeed's default 5e8 bf16 elements, 1e9 bytes, persistent in the table) is freed
    by the backward's epilogue before it, and ZeRO-2's gradients are the partition the step reads."""
    plain, ep = _rows(_plan(2, 4, 1)), _rows(_plan(2, 4, 2))
    assert plain["policy weights (experts 8/8)"] == (49152, 0) and ep["policy weights (experts 4/8)"] == (24576, 0)
    assert plain["policy gradients (experts 8/8)"] == ep["policy gradients (experts 4/8)"] == (12288, 0)
    assert _plan(2, 4, 2).phases["step"] == 4 * (2728 + 6144) - 2 * 500_000_000


def test_moe_layer_activations_by_hand():
    """T = 100 tokens, bf16, sdpa, ep 2. Per token: norms 2·8·32 = 512, attention 2·(5·32 + 4·16) =
    448; the MoE block: experts 2·(4·2·16 + 2·2·32) = 512, router logits 4·8 = 32: 1504, so one layer
    150400. Without checkpointing both layers are kept (300800), plus the final norm 8·32·100 =
    25600, the scored hidden 2·32·100 = 6400 and the mask 100² = 10000: 342800. The backward's layer
    150400 plus the all-to-all buffers 4·100·2·32·2 = 51200. The MoE terms count 3 layers' worth
    (2 kept, 1 in the backward): experts 3·512·100 = 153600, router 3·32·100 = 9600."""
    out = train_pass(TOY, T, w=2, tp=1, checkpointing=False, attn="sdpa", ep=2)
    assert out["activations"] == 342800 and out["backward"] == 150400 + 51200
    assert out["moe"] == {"MoE experts (top-2 of 8)": 153600, "MoE shared expert": 0,
                          "MoE router logits (fp32)": 9600, "EP all-to-all buffers": 51200}
    ckpt = train_pass(TOY, T, w=2, tp=1, checkpointing=True, attn="sdpa", ep=1)
    # Layer inputs 2·32·2·100 = 12800 + one recomputed layer 150400, the rest as above; no all-to-all.
    assert ckpt["activations"] == 12800 + 150400 + 25600 + 6400 + 10000 and ckpt["backward"] == 150400
    assert ckpt["moe"]["MoE experts (top-2 of 8)"] == 2 * 512 * 100 and ckpt["moe"]["EP all-to-all buffers"] == 0


def test_no_grad_moe_layer_by_hand():
    """Per token: input and residual 2·2·32 = 128, q, k, v 2·(32 + 2·16) = 128; the block 2·(3·2·16 +
    2·2·32) = 448 + router 32, and under ep 2 the all-to-all buffers 4·2·32·2 = 512: 1248 a token,
    124800 for 100, plus the mask 10000. Without EP: 736 a token, 83600."""
    assert no_grad_pass(TOY, T, w=2, tp=1, attn="sdpa", ep=2) == 134800
    assert no_grad_pass(TOY, T, w=2, tp=1, attn="sdpa", ep=1) == 83600


def test_zero3_gathers_a_whole_moe_block_without_ep_and_its_own_experts_with():
    """Plain ZeRO-3 gathers every expert and the router of a layer: 2·(8192 + 4096 + 256) = 25088,
    and in the backward the gate_up tensor's gradient 2·8192 = 16384 too. Under ep 2 the rank's
    experts only: 2·12288/2 = 12288, with the gradient 2·4096 = 8192. ZeRO-2 gathers nothing."""
    plain, ep = _plan(3, 2, 1), _plan(3, 2, 2)
    assert plain.details["no-grad"]["MoE block gather (ZeRO-3)"] == 25088
    assert plain.details["train"]["MoE block gather+grad (ZeRO-3)"] == 25088 + 16384
    assert ep.details["no-grad"]["MoE block gather (ZeRO-3)"] == 12288
    assert ep.details["train"]["MoE block gather+grad (ZeRO-3)"] == 12288 + 8192
    assert "MoE block gather (ZeRO-3)" not in _plan(2, 2, 1).details["no-grad"]
    # The no-grad phase's all-to-all: the target and KL rows' 200 tokens, 4·200·2·32·2.
    assert ep.details["no-grad"]["EP all-to-all buffers"] == 102400


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1)


@pytest.mark.parametrize("config, want", [
    # Layer 0 dense (mlp_only_layers): attention 1024 + 512 + 512 + 1024, q/k norms 2·16, norms 64,
    # MLP 3·64·32 = 6144: 9312. Experts 4·32·32 = 4096 and 4·32·16 = 2048; router 4·32 = 128.
    (lambda: Qwen3MoeConfig(**SMALL, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                            mlp_only_layers=[0]),
     MoeShape(experts=4, top_k=2, expert_intermediate=16, layers=3, expert_params=(4096, 2048), block_params=128,
              dense_layer_params=9312)),
    # decoder_sparse_step 2: layers 1, 3 MoE. Block: router 128, shared expert 3·24·32 = 2304, its gate 32.
    (lambda: Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                            shared_expert_intermediate_size=24, decoder_sparse_step=2),
     MoeShape(experts=4, top_k=2, expert_intermediate=16, layers=2, expert_params=(4096, 2048), block_params=2464,
              shared_intermediate=24, dense_layer_params=9344)),
    # Mixtral: every layer MoE, experts as wide as intermediate_size: 4·128·32 and 4·32·64.
    (lambda: MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
     MoeShape(experts=4, top_k=2, expert_intermediate=64, layers=4, expert_params=(16384, 8192), block_params=128)),
])
def test_shape_of_moe_families(config, want):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config())
    shape = shape_of(model)
    assert shape.moe == want and shape.total == sum(p.numel() for p in model.parameters())


def test_qwen3_30b_a3b_shape():
    """configs/models/qwen3-30b-a3b: embedding and head 151936·2048 = 311,164,928 each; a layer: q and o
    2048·4096 = 8,388,608 each, k and v 2048·512 = 1,048,576 each, q/k norms 2·128, norms 2·2048,
    router 128·2048 = 262,144, experts 128·1536·2048 = 402,653,184 and 128·2048·768 = 201,326,592:
    623,120,640; 48 layers 29,909,790,720; with the final norm 30,532,122,624. Experts 48·603,979,776 =
    28,991,029,248; active per token (8 of 128) 30,532,122,624 - 28,991,029,248·120/128 = 3,353,032,704."""
    shape = model_shape(os.path.join(REPO, "configs", "models", "qwen3-30b-a3b"))
    assert shape.per_layer == 623_120_640 and shape.total == 30_532_122_624
    assert shape.expert_total == 28_991_029_248
    assert shape.moe.experts == 128 and shape.moe.top_k == 8 and shape.moe.expert_intermediate == 768
    plan = plan_memory(PlanInputs(shape=shape, world_size=8, dp=8, ep=8, zero={"stage": 3}))
    assert plan.params["active per token"] == 3_353_032_704
