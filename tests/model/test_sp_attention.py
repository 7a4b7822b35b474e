"""packed_sdpa (megakto/model/sp_attention.py), the CPU core attention of sequence parallelism, in
one process: packed sequences scored through it equal each sequence alone, its mask is the
block-diagonal causal one (banded with a sliding window), and the sequence-parallel log-prob
function at sp 1 (one shard, labels shifted before the cut) equals the trainer's packed one. The
same attention under Ulysses on several ranks: tests/distributed/test_sequence_parallel.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from megakto.data.packing import pack, pad_rows
from megakto.distributed.sequence import grad_scale, sequence_sum
from megakto.errors import ModelError
from megakto.model.forward import packed_completion_logps
from megakto.model.sp_attention import (PACKED_SDPA, document_ids, document_spans, packed_causal_mask,
                                        register_packed_sdpa)
from megakto.model.sp_forward import sequence_parallel_logps

ROWS = [([5, 6, 7], [8, 9, 10, 11, 12]), ([13, 14], [15, 16, 17]), ([18], [19, 20, 21, 22, 23, 24]),
        ([25, 26, 27, 28], [29, 30])]


def _model(attn, kv=2, window=None):
    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=kv, tie_word_embeddings=False)
    config = MistralConfig(**shape, sliding_window=window) if window else LlamaConfig(**shape)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def test_document_ids_follow_transformers_rule():
    """A new sequence wherever a position does not follow its predecessor by +1, and at t = 0."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3], [5, 6, 7, 8, 0, 1, 2, 2, 3, 4]])
    assert document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]]


def test_document_spans():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 0, 1]])
    assert document_spans(pos) == [[(0, 3), (3, 5), (5, 9)], [(0, 7), (7, 9)]]


def test_mask_is_block_diagonal_causal_and_banded():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    assert packed_causal_mask(pos)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert packed_causal_mask(pos, sliding_window=2)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_packed_rows_score_as_alone(kv):
    register_packed_sdpa()
    packed, plain = _model(PACKED_SDPA, kv), _model("sdpa", kv)
    with torch.no_grad():
        got, n = packed_completion_logps(packed, pack(ROWS, 16, 0), attn=PACKED_SDPA)
        one_row, _ = packed_completion_logps(packed, pack(ROWS, 64, 0), attn=PACKED_SDPA)  # all four in one row
        want = torch.cat([packed_completion_logps(plain, pad_rows([r], 0), attn="sdpa")[0] for r in ROWS])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(one_row, want, rtol=0, atol=2e-6)
    assert n.tolist() == [5, 3, 6, 2]  # every completion token


def test_sliding_window_as_transformers_applies_it():
    """Mistral with a window of 3 tokens, shorter than every sequence: each sequence gets its own band."""
    register_packed_sdpa()
    packed, plain = _model(PACKED_SDPA, window=3), _model("sdpa", window=3)
    with torch.no_grad():
        got, _ = packed_completion_logps(packed, pack(ROWS, 16, 0), attn=PACKED_SDPA)
        want = torch.cat([packed_completion_logps(plain, pad_rows([r], 0), attn="sdpa")[0] for r in ROWS])
        unbanded, _ = packed_completion_logps(_model("sdpa", window=64), pad_rows(ROWS, 0), attn="sdpa")
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert float((want - unbanded).abs().max()) > 1e-3  # the window changed the scores


def test_sp1_logps_equal_the_packed_ones_with_grad():
    """One shard (sp 1): labels shifted before the cut, the rows laid end to end, the identity combine."""
    register_packed_sdpa()
    model = _model(PACKED_SDPA).train()
    got, n = sequence_parallel_logps(model, pack(ROWS, 16, 0), sp_size=1, sp_rank=0, combine=sequence_sum(group=None))
    got.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    want, want_n = packed_completion_logps(model, pack(ROWS, 16, 0), attn=PACKED_SDPA)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert torch.equal(n, want_n)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-6, msg=k)


def test_refuses_what_it_cannot_score():
    register_packed_sdpa()
    model = _model(PACKED_SDPA)
    q = torch.zeros(1, 4, 3, 8)
    from megakto.model.sp_attention import packed_sdpa_attention

    with pytest.raises(ModelError, match="needs position_ids"):
        packed_sdpa_attention(model.model.layers[0].self_attn, q, q, q, None)
    with pytest.raises(ModelError, match="scores whole sequences: 1 queries for 3 keys"):
        packed_sdpa_attention(model.model.layers[0].self_attn, q[:, :, :1], q, q, None,
                              position_ids=torch.arange(3)[None])


@pytest.mark.parametrize("zero, want", [
    ({"stage": 3}, 1.0),  # reduce_scatter_coalesced divides by dp × sp: the sp copies cancel
    ({"stage": 3, "reduce_scatter": True}, 1.0),
    ({"stage": 3, "reduce_scatter": False}, 0.5),  # divides by dp only
    ({"stage": 2}, 0.5),
])
def test_grad_scale_follows_deepspeeds_averaging(zero, want):
    assert grad_scale({"zero_optimization": zero}, 2) == want
