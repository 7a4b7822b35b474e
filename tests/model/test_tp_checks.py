"""Tensor-parallel checks on the model config (before loading) and on the head (after the engine),
and the join of TP shards back into whole tensors."""

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from megakto.errors import ModelError
from megakto.model.tp_checks import AUTOTP_PLAN_STYLES, check_tp_config, check_vocab_parallel_head
from megakto.model.tp_merge import full_shapes, join_shard_shapes, merge_tp_shards, tied_aliases

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)


def _error(config, tp):
    with pytest.raises(ModelError) as info:
        check_tp_config(config, tp, key="model.path=m")
    return str(info.value)


def test_divisible_config_passes():
    check_tp_config(LlamaConfig(**SHAPE), 2)
    check_tp_config(LlamaConfig(**SHAPE), 1)
    check_tp_config(GPT2Config(), 1)  # tp 1: nothing is checked


@pytest.mark.parametrize("field, value, tp, what, hint", [
    ("num_attention_heads", 6, 4, "attention heads", "choose a parallel.tp_size dividing 6"),
    ("num_key_value_heads", 2, 4, "key-value heads", "choose a parallel.tp_size dividing 2"),
    ("intermediate_size", 130, 4, "MLP width", "choose a parallel.tp_size dividing 130"),
    ("vocab_size", 510, 4, "vocabulary", "pad the vocabulary to a multiple of 4 "
     "(model.resize_token_embeddings(n, pad_to_multiple_of=4) and save the model)"),
])
def test_indivisible_sizes_are_named(field, value, tp, what, hint):
    # Everything else divisible by 4: 8 heads, 4 kv heads, width 128, vocabulary 512.
    shape = {**SHAPE, "num_attention_heads": 8, "num_key_value_heads": 4, field: value}
    if field == "num_attention_heads":
        shape.update(num_key_value_heads=6, hidden_size=96)
    assert _error(LlamaConfig(**shape), tp) == (
        f"model.path=m: parallel.tp_size={tp} does not divide the {what}: {field}={value}; {hint}")


def test_model_without_a_tp_plan_is_refused():
    assert _error(GPT2Config(), 2) == (
        "model.path=m: parallel.tp_size=2: GPT2Config (gpt2) has no tensor-parallel plan (base_model_tp_plan), "
        "so AutoTP cannot be trusted to split it; use parallel.tp_size=1 (ZeRO-3 splits it instead)")


class _Head(torch.nn.Module):
    def __init__(self, rows, start=None, bias=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(rows, 4))
        self.bias = torch.nn.Parameter(torch.zeros(rows)) if bias else None
        if start is not None:
            self.vocab_start_index, self.vocab_end_index = start, start + rows


class _Model(torch.nn.Module):
    """What the check reads of a model: ``config.vocab_size`` and its output embedding."""

    def __init__(self, head, vocab_size=512):
        super().__init__()
        self.head, self.config = head, LlamaConfig(**{**SHAPE, "vocab_size": vocab_size})

    def get_output_embeddings(self):
        return self.head


def test_vocab_parallel_head_check():
    check_vocab_parallel_head(_Model(_Head(256, start=256)), 2)
    check_vocab_parallel_head(_Model(_Head(512)), 1)
    # tp 1 asks nothing of the head: a biased one (a model.logps=full model such as Phi) is fine.
    check_vocab_parallel_head(_Model(_Head(512, bias=True)), 1)
    with pytest.raises(ModelError) as info:
        check_vocab_parallel_head(_Model(_Head(512)), 2)  # left whole: log-probs over the wrong rows
    assert str(info.value) == (
        "parallel.tp_size=2: the output head is a _Head with 512 rows, not a vocabulary-parallel head of 256 "
        "rows per rank; this deepspeed did not split it (needs tensor_parallel.vocab_parallel_lm_head)")
    with pytest.raises(ModelError, match="with 128 rows"):
        check_vocab_parallel_head(_Model(_Head(128, start=0)), 2)


def test_merge_joins_along_the_split_dimension():
    g = torch.Generator().manual_seed(0)
    whole = {"col.weight": torch.randn(8, 4, generator=g), "row.weight": torch.randn(4, 8, generator=g),
             "norm.weight": torch.randn(4, generator=g), "col.bias": torch.randn(8, generator=g)}
    shapes = {k: tuple(v.shape) for k, v in whole.items()}
    tp = 2
    shards = [{"col.weight": whole["col.weight"].chunk(tp, 0)[r], "row.weight": whole["row.weight"].chunk(tp, 1)[r],
               "norm.weight": whole["norm.weight"].clone(), "col.bias": whole["col.bias"].chunk(tp, 0)[r]}
              for r in range(tp)]
    merged = merge_tp_shards(shards, shapes)
    assert sorted(merged) == sorted(whole)
    for k in whole:
        assert torch.equal(merged[k], whole[k]), k
    assert merge_tp_shards(shards[:1], {}) == shards[0]  # one shard: as it is


def test_merge_refuses_what_it_cannot_join():
    shapes = {"w": (8, 4), "n": (4,)}
    a = {"w": torch.zeros(4, 4), "n": torch.zeros(4)}
    drifted = [a, {"w": torch.zeros(4, 4), "n": torch.full((4,), 0.5)}]
    with pytest.raises(ModelError, match="n: replicated on every tensor-parallel rank but the copies differ by up "
                                         "to 0.5; rank 0's copy is used"):
        merge_tp_shards(drifted, shapes)
    warnings = []  # the export's way: rank 0's copy, and a warning naming the difference
    merged = merge_tp_shards(drifted, shapes, warn=warnings.append)
    assert torch.equal(merged["n"], torch.zeros(4)) and len(warnings) == 1 and "up to 0.5" in warnings[0]
    with pytest.raises(ModelError, match=r"w: a tensor-parallel shard of shape \(3, 4\) is not 1/2 of the model's"):
        merge_tp_shards([{"w": torch.zeros(3, 4), "n": torch.zeros(4)}] * 2, shapes)
    with pytest.raises(ModelError, match="disagree on their tensors"):
        merge_tp_shards([a, {"w": torch.zeros(4, 4)}], shapes)
    with pytest.raises(ModelError, match="x is not a tensor of the model config"):
        merge_tp_shards([{"x": torch.zeros(1)}] * 2, shapes)


def test_shard_shapes_join_to_whole_shapes():
    """Recorded shard shapes (2 tp ranks) against a model's whole shapes: replicated and split ones
    give the whole shape (an uneven vocabulary split too); another model's are joined along the one
    dimension that differs, or described as held; one rank's shapes are whole already."""
    whole = {"q": [64, 64], "o": [64, 64], "norm": [64], "head": [10, 64], "down": [64, 128], "odd": [8, 8]}
    shards = [{"q": [32, 64], "o": [64, 32], "norm": [64], "head": [6, 64], "down": [64, 48], "odd": [3, 3]},
              {"q": [32, 64], "o": [64, 32], "norm": [64], "head": [4, 64], "down": [64, 48], "odd": [3, 3]}]
    assert join_shard_shapes(shards, whole) == {"q": [64, 64], "o": [64, 64], "norm": [64], "head": [10, 64],
                                                "down": [64, 96], "odd": "[3, 3] on each of 2 tensor-parallel ranks"}
    assert join_shard_shapes(shards[:1], whole) == shards[0]
    assert join_shard_shapes([{"x": [4]}, {}], {"x": [8]}) == {"x": "[[4], None] on the 2 tensor-parallel ranks"}


def test_full_shapes_from_a_config():
    shapes = full_shapes(LlamaConfig(**SHAPE, tie_word_embeddings=False))
    assert shapes["lm_head.weight"] == (512, 64)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (32, 64)  # 2 kv heads × head_dim 16
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)


def test_tied_alias_given_on_one_rank_only_is_the_joined_source():
    """A tied head recorded under its alias in one TP rank's checkpoint file only (zero_to_fp32 on a
    tied Qwen2 under AutoTP) is set aside and given the joined embedding."""
    emb = torch.arange(32.0).reshape(8, 4)
    shapes = {"embed.weight": (8, 4), "head.weight": (8, 4)}
    shards = [{"embed.weight": emb[:4], "head.weight": emb[:4]}, {"embed.weight": emb[4:]}]
    with pytest.raises(ModelError, match="disagree on their tensors"):
        merge_tp_shards(shards, shapes)
    merged = merge_tp_shards(shards, shapes, aliases={"head.weight": "embed.weight"})
    assert torch.equal(merged["embed.weight"], emb) and merged["head.weight"] is merged["embed.weight"]
    # A live gather names each parameter once: an alias no shard held stays absent.
    unnamed = [{"embed.weight": emb[:4]}, {"embed.weight": emb[4:]}]
    assert sorted(merge_tp_shards(unnamed, shapes, aliases={"head.weight": "embed.weight"})) == ["embed.weight"]


def test_tied_aliases_from_a_config():
    assert tied_aliases(LlamaConfig(**SHAPE, tie_word_embeddings=True)) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_aliases(LlamaConfig(**SHAPE, tie_word_embeddings=False)) == {}


def test_plan_styles_are_deepspeeds():
    from deepspeed.module_inject.tp_plan_converter import SUPPORTED_STYLES

    assert AUTOTP_PLAN_STYLES == frozenset(SUPPORTED_STYLES)


@pytest.mark.parametrize("family, layer", [("phi3", "layers.*.mlp.down_proj"), ("olmo2", "layers.*.self_attn.o_proj")])
def test_plan_styles_autotp_lacks_are_refused_before_loading(family, layer):
    from megakto._demo.tiny_model import family_config

    config = family_config(family, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64)
    with pytest.raises(ModelError) as info:
        check_tp_config(config, 2)
    name = type(config).__name__
    assert str(info.value) == (
        f"model.path: parallel.tp_size=2: {name} ({config.model_type})'s tensor-parallel plan splits {layer} as "
        "rowwise_split_input, which DeepSpeed's AutoTP does not implement; use parallel.tp_size=1 (ZeRO-3 splits "
        "it instead)")
