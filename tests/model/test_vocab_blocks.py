"""Vocabulary-blocked embedding and head: the same numbers as the whole matrices, in values and in
the gradient of every parameter (blocks joined back), for every log-prob path, tied or not."""

import types

import pytest
import torch

from megakto.data.collate import collate
from megakto.data.packing import pack
from megakto.distributed.engine import block_vocab, split_vocab
from megakto.errors import ModelError
from megakto.model.forward import completion_logps, packed_completion_logps
from megakto.model import vocab_blocks
from megakto.model.vocab_blocks import (
    BlockedEmbedding,
    BlockedHead,
    auto_block_rows,
    block_sizes,
    blocked_token_logps,
    merge_vocab_blocks,
    resolve_block_rows,
)
from megakto.kto.chunked_logps import local_targets, shard_stats, token_logps
from tests.model.test_forward import _model, ground_truth
from tests.model.test_forward import _rows as _forward_rows

PAD = 0
V = 301


def _rows():
    # Completions that also hit the first and the last id: the ends of the first and last blocks.
    return _forward_rows() + [([5, 6], [0, V - 1, 1])]


def _grads(model):
    return merge_vocab_blocks({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})


def test_block_sizes_and_auto_rows():
    assert block_sizes(10, 4) == [4, 4, 2]
    assert block_sizes(8, 4) == [4, 4]
    assert block_sizes(3, 5) == [3]
    assert auto_block_rows(256) == 16384 and auto_block_rows(4096) == 1024
    assert resolve_block_rows("auto", 256000, 256) == 16384
    assert resolve_block_rows(0, 256000, 256) == 0
    assert resolve_block_rows(300000, 256000, 256) == 0  # one block: nothing to split
    with pytest.raises(ValueError):
        block_sizes(10, 0)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("rows", [64, 100, 300])
@pytest.mark.parametrize("mode,chunk", [("chunked", 5), ("chunked", None), ("full", None)])
def test_blocked_model_equals_whole_model(tie, rows, mode, chunk):
    data = _rows()
    model = _model(tie)
    ref, _, ref_grads = ground_truth(model, data)

    block_vocab(model, rows, {})
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, BlockedEmbedding) and isinstance(head, BlockedHead)
    assert emb.sizes == block_sizes(V, rows)
    n_blocks = len(emb.sizes)
    names = [k for k, _ in model.named_parameters()]
    assert not any(k.endswith("embed_tokens.weight") or k == "lm_head.weight" for k in names)
    assert sum(".vocab_blocks." in k for k in names) == n_blocks * (1 if tie else 2)
    if tie:
        assert all(a is b for a, b in zip(emb.vocab_blocks, head.vocab_blocks))

    got, _ = packed_completion_logps(model, pack(data, 40, PAD), attn="sdpa", mode=mode, chunk_tokens=chunk)
    got.sum().backward()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    grads = _grads(model)
    expected = {k for k in ref_grads if not (tie and k == "lm_head.weight")}
    assert set(grads) == expected
    for k in expected:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)


def test_blocked_token_logps_gradcheck():
    """float64: the blocked kernel equals the whole-matrix one, and its gradients (hidden and every
    block) equal finite differences through the block combination."""
    torch.manual_seed(3)
    hidden = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64)
    targets = torch.tensor([0, 10, 3, 4, 7, 10])
    head = BlockedHead.from_weight(weight, 4).double()
    blocks = list(head.vocab_blocks.parameters())

    def fn(h, *ws):
        for p, w in zip(blocks, ws):
            p.data = w
        return blocked_token_logps(head, h, targets, lambda rows: 2)

    # Against the whole-matrix kernel...
    torch.testing.assert_close(fn(hidden, *[b.detach() for b in blocks]),
                               token_logps(hidden, weight, targets, chunk_size=3), rtol=0, atol=1e-12)
    # ... and against finite differences (hidden and every block weight).
    ws = [b.detach().clone().requires_grad_(True) for b in blocks]

    def through(h, *w):
        lse, tgt = [], []
        for (start, rows, _), wk in zip(head.ranges(), w):
            a, b = shard_stats(h, wk, local_targets(targets, start, rows), 2)
            lse.append(a)
            tgt.append(b)
        return torch.stack(tgt).sum(0) - torch.logsumexp(torch.stack(lse), 0)

    assert torch.autograd.gradcheck(through, (hidden, *ws))


def test_embedding_keeps_padding_idx_and_rejects_out_of_range_ids():
    weight = torch.randn(10, 3)
    ids = torch.tensor([[0, 9, 4], [4, 7, 3]])
    plain = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False, padding_idx=4)
    blocked = BlockedEmbedding.from_weight(weight, 3, padding_idx=4)
    up = torch.randn(2, 3, 3)
    (plain(ids) * up).sum().backward()
    out = blocked(ids)
    torch.testing.assert_close(out, plain(ids), rtol=0, atol=0)
    (out * up).sum().backward()
    merged = merge_vocab_blocks({f"e.vocab_blocks.{k}.weight": b.weight.grad
                                 for k, b in enumerate(blocked.vocab_blocks)})["e.weight"]
    torch.testing.assert_close(merged, plain.weight.grad, rtol=0, atol=1e-6)
    assert merged[4].abs().sum() == 0  # the padding row gets no gradient
    with pytest.raises(IndexError, match="token id 10 is outside the vocabulary"):
        blocked(torch.tensor([1, 10]))


def test_merge_names_and_gaps():
    sd = {"a.vocab_blocks.1.weight": torch.ones(1, 2), "a.vocab_blocks.0.weight": torch.zeros(2, 2),
          "b.weight": torch.full((3,), 7.0)}
    out = merge_vocab_blocks(sd)
    assert set(out) == {"a.weight", "b.weight"}
    assert out["a.weight"].tolist() == [[0, 0], [0, 0], [1, 1]]
    with pytest.raises(ValueError, match="blocks \\[0, 2\\]"):
        merge_vocab_blocks({"a.vocab_blocks.0.weight": torch.ones(1), "a.vocab_blocks.2.weight": torch.ones(1)})


def test_refuses_a_head_with_bias():
    model = _model(False)
    model.lm_head = torch.nn.Linear(64, V, bias=True)
    with pytest.raises(ModelError, match="model.vocab_block_rows=0"):
        block_vocab(model, 100, {})


class _ScaledEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.0


@pytest.fixture
def small_auto(monkeypatch):
    """auto = 65 rows at hidden 64, so the 301-row vocabulary is split in 5 blocks."""
    monkeypatch.setattr(vocab_blocks, "AUTO_BLOCK_ELEMENTS", 64 * 65)


@pytest.mark.parametrize("setting, split", [("auto", True), (100, True), (0, False), (1000, False)])
def test_split_vocab_settings(small_auto, setting, split):
    model = _model(False)
    model.config = types.SimpleNamespace()  # composite configs have no top-level sizes; not needed
    split_vocab(model, setting, {})
    emb = model.get_input_embeddings()
    assert isinstance(emb, BlockedEmbedding) is split
    if setting == "auto":
        assert emb.sizes == [65, 65, 65, 65, 41]


@pytest.mark.parametrize("make", [lambda: _ScaledEmbedding(V, 64), lambda: torch.nn.Embedding(V, 64, scale_grad_by_freq=True),
                                  lambda: torch.nn.Embedding(V, 64, sparse=True)])
def test_auto_leaves_an_unsplittable_embedding_and_a_row_count_refuses_it(small_auto, make):
    model = _model(False)
    model.model.embed_tokens = make()
    before = model.get_input_embeddings()
    split_vocab(model, "auto", {})
    assert model.get_input_embeddings() is before
    with pytest.raises(ModelError, match="model.vocab_block_rows=100: the input embedding .*; "
                                         "set model.vocab_block_rows=0"):
        split_vocab(model, 100, {})


def test_bf16_hidden_gradient_is_summed_over_blocks_in_fp32():
    """A bf16 head in 256 blocks: the hidden gradient is as close to the float64 truth as the
    whole-matrix kernel's (relative error 4.97e-3 for both here, most of it the inputs' own rounding
    to bf16; 1.09e-2 vs 1.08e-2 while the matmuls ran in bf16; with each block's share summed in
    bf16 it was 1.29e-2, and grows with the number of blocks)."""
    torch.manual_seed(0)
    n, h, v = 64, 128, 4096
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (n,))
    up = torch.randn(n, dtype=torch.float64)

    def grad(fn, hid):
        hid = hid.detach().requires_grad_(True)
        (fn(hid) * up.to(fn(hid).dtype)).sum().backward()
        return hid.grad.double()

    truth = grad(lambda x: token_logps(x, weight, targets), hidden)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    whole = grad(lambda x: token_logps(x, wb, targets, chunk_size=16), hb)
    head = BlockedHead.from_weight(wb, v // 256)
    blocked = grad(lambda x: blocked_token_logps(head, x, targets, lambda rows: 16), hb)
    err = lambda g: float((g - truth).norm() / truth.norm())  # noqa: E731
    assert err(blocked) < 1.08 * err(whole), (err(blocked), err(whole))


def test_blocked_model_with_an_explicit_eager_mask():
    """packed_forward_logps(attention="mask") reads the model's dtype for an additive mask; a
    blocked embedding has no .weight of its own."""
    from megakto.model.packed import packed_forward_logps

    data = _rows()
    model = _model(False, attn="eager")
    ref, _ = completion_logps(model, collate(data, pad_id=PAD))
    block_vocab(model, 100, {})
    got, _ = packed_forward_logps(model, pack(data, 40, PAD), attn="eager", attention="mask")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
