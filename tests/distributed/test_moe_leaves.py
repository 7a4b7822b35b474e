"""ZeRO-3 leaf modules for mixture-of-experts blocks (engine.with_moe_leaves): DeepSpeed's default
list names Mixtral and Qwen2/3-MoE; megakto adds the model's own MoE block class for the others
(Qwen3.5-MoE, Qwen3-Next), keeps DeepSpeed's defaults and a user's own list, and leaves dense
models and ZeRO 0-2 alone."""

import pytest
import torch
from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES
from transformers import AutoModelForCausalLM, Qwen3_5MoeTextConfig, Qwen3MoeConfig, Qwen3NextConfig, Qwen3Config

from megakto.distributed.engine import with_moe_leaves

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
ZERO3 = {"zero_optimization": {"stage": 3}}


def _meta(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("config, block", [
    (lambda: Qwen3_5MoeTextConfig(**SMALL, **MOE, shared_expert_intermediate_size=16),
     "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeSparseMoeBlock"),
    (lambda: Qwen3NextConfig(**SMALL, **MOE, shared_expert_intermediate_size=16),
     "transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextSparseMoeBlock"),
])
def test_families_deepspeed_misses_are_added(config, block):
    assert block not in DEFAULT_LEAF_MODULE_CLASSES
    got = with_moe_leaves(_meta(config()), ZERO3)
    assert got["zero_optimization"]["leaf_module"]["classes"] == DEFAULT_LEAF_MODULE_CLASSES + [block]
    assert "leaf_module" not in ZERO3["zero_optimization"]  # the caller's dict is left as it was


def test_a_default_family_and_a_users_list():
    moe = _meta(Qwen3MoeConfig(**SMALL, **MOE))
    assert with_moe_leaves(moe, ZERO3)["zero_optimization"]["leaf_module"]["classes"] == DEFAULT_LEAF_MODULE_CLASSES
    mine = {"zero_optimization": {"stage": 3, "leaf_module": {"classes": ["my.Block"]}}}
    assert with_moe_leaves(moe, mine)["zero_optimization"]["leaf_module"]["classes"] == [
        "my.Block", "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock"]


def test_dense_models_and_other_stages_unchanged():
    assert with_moe_leaves(_meta(Qwen3Config(**SMALL)), ZERO3) is ZERO3
    zero2 = {"zero_optimization": {"stage": 2}}
    assert with_moe_leaves(_meta(Qwen3MoeConfig(**SMALL, **MOE)), zero2) is zero2
