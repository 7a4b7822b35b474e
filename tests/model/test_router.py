"""The router's balancing loss through a real tiny Qwen3-MoE forward, one process
(megakto/model/router.py over megakto/kto/router_aux.py): on rows padded one per row it equals
transformers' own ``aux_loss`` with the 2-D attention mask, value and gradient; packed rows give
the same value, loads and router gradient as the same rows padded (the same token set), where
transformers' unmasked value counts the padding; a forward whose router logits carry no gradient
(reentrant checkpointing) is refused in one line."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from megakto._demo.tiny_model import family_config
from megakto.data.collate import collate
from megakto.data.packing import pack, pad_rows
from megakto.errors import ModelError
from megakto.model.forward import packed_completion_logps
from megakto.model.router import micro_batch_balance, real_tokens

PAD, TOP_K = 0, 2
PAIRS = [([5, 9, 14], [22, 7, 31, 40]), ([3, 60], [17, 18, 19, 20, 21, 2]), ([44, 45, 46, 47, 48], [6]),
         ([11, 12], [13, 33, 34])]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = family_config("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, max_position_embeddings=64)
    m = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # routers sharper than the init's near-uniform ones: distinct top-2 choices
        for layer in m.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return m.train()


def _gates(m):
    return [layer.mlp.gate.weight for layer in m.model.layers]


def _balance(m, batch):
    logits = []
    packed_completion_logps(m, batch, attn="sdpa", router_logits=logits)
    return micro_batch_balance(logits, batch, TOP_K)


def _grads(m, loss):
    m.zero_grad()
    loss.backward()
    return [g.grad.clone() for g in _gates(m)]


def test_padded_rows_equal_transformers_aux_loss_with_the_attention_mask(model):
    padded = collate(PAIRS, PAD)
    out = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, output_router_logits=True,
                use_cache=False)
    want_grads = _grads(model, out.aux_loss)
    mine = _balance(model, pad_rows(PAIRS, PAD))  # position ids, no attention mask: megakto's own layout
    torch.testing.assert_close(mine.loss, out.aux_loss, rtol=0, atol=1e-6)
    for got, want in zip(_grads(model, mine.loss), want_grads):
        assert want.abs().max() > 1e-4  # the router gets a gradient
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert float(mine.tokens) == sum(len(p) + len(c) for p, c in PAIRS) == 26
    assert mine.counts.shape == (2, 4) and mine.counts.sum(1).tolist() == [26.0 * TOP_K] * 2


def test_packed_rows_count_the_same_tokens_as_padded_ones(model):
    unpacked_batch, packed_batch = pad_rows(PAIRS, PAD), pack(PAIRS, 12, PAD)
    assert packed_batch.input_ids.shape[0] < len(PAIRS)  # some rows share a packed row
    unpacked, packed = _balance(model, unpacked_batch), _balance(model, packed_batch)
    assert torch.equal(packed.counts, unpacked.counts) and float(packed.tokens) == float(unpacked.tokens)
    torch.testing.assert_close(packed.loss, unpacked.loss, rtol=0, atol=1e-6)
    for got, want in zip(_grads(model, packed.loss), _grads(model, unpacked.loss)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # transformers' own value on the packed forward counts the padding too.
    out = model(input_ids=packed_batch.input_ids, position_ids=packed_batch.position_ids, output_router_logits=True,
                use_cache=False)
    assert int((~real_tokens(packed_batch)).sum()) > 0
    assert abs(float(out.aux_loss.detach()) - float(packed.loss.detach())) > 1e-3


def test_router_logits_without_gradient_are_refused(model):
    """Reentrant checkpointing runs each layer without autograd: the captured logits have no graph.
    Non-reentrant checkpointing (what megakto enables) keeps it: the same value and gradient."""
    batch = pack(PAIRS, 12, PAD)
    plain = _balance(model, batch)
    want = _grads(model, plain.loss)
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        again = _balance(model, batch)
        torch.testing.assert_close(again.loss, plain.loss, rtol=0, atol=1e-7)
        for got, w in zip(_grads(model, again.loss), want):
            torch.testing.assert_close(got, w, rtol=0, atol=1e-7)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        with pytest.raises(ModelError) as info:
            _balance(model, batch)
    finally:
        model.gradient_checkpointing_disable()
    assert str(info.value) == (
        "the router logits carry no gradient (reentrant gradient checkpointing?), so the balancing loss would not "
        "train the router; checkpoint with use_reentrant=False or set kto.router_aux_coef=0")


def test_no_router_logits_requested_without_a_list(model):
    """router_logits=None (kto.router_aux_coef=0): the forward is called exactly as before."""
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(sorted(kw)), with_kwargs=True)
    try:
        packed_completion_logps(model, pack(PAIRS, 12, PAD), attn="sdpa")
        packed_completion_logps(model, pack(PAIRS, 12, PAD), attn="sdpa", router_logits=[])
    finally:
        handle.remove()
    assert calls == [["attention_mask", "input_ids", "position_ids", "use_cache"],
                     ["attention_mask", "input_ids", "output_router_logits", "position_ids", "use_cache"]]
