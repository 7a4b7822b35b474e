"""Packed forward on a tiny random Llama equals the padded forward, values and gradients.

The reference is the padded path the trainer already uses: ``collate`` + ``completion_logps``.
The packed path relies on transformers building a block-diagonal causal mask from restarting
``position_ids`` (``attention="auto"``) or on our explicit 4D mask (``attention="mask"``).
"""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megakto.data.collate import collate
from megakto.data.packing import pack
from megakto.model.forward import completion_logps  # the padded ground truth
from megakto.model.packed import packed_attention_mask, packed_forward_logps

PAD = 0
VOCAB = 300


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config).float()
    model.set_attn_implementation(attn)
    return model.eval()


def _rows(seed: int, n: int = 12):
    """n rows of 2..30 tokens; prompts of 1..n-1 tokens (a KTO prompt is never empty)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(2, 30)
        ids = [rng.randint(1, VOCAB - 1) for _ in range(length)]
        k = rng.randint(1, length - 1)
        rows.append((ids[:k], ids[k:]))
    return rows


def _grads(model, logps):
    model.zero_grad()
    logps.sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_packed_attention_mask_hand_worked():
    """Segments [0, 0, 1, -1]: token 2 starts a new block (sees only itself), the pad sees only
    itself; bool True = attend; additive form 0 / finfo.min."""
    m = packed_attention_mask(torch.tensor([[0, 0, 1, -1]]))
    assert m.shape == (1, 1, 4, 4)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    add = packed_attention_mask(torch.tensor([[0, 0, 1, -1]]), torch.float32)
    assert add.dtype == torch.float32
    assert torch.equal(add == 0, m)
    assert (add[~m] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("attention,flatten", [("auto", False), ("mask", False), ("auto", True)])
def test_packed_equals_padded(attn, attention, flatten):
    """12 rows packed into rows of 64 (several segments per row, padded tails); log-probs, token
    counts and every parameter gradient of sum(logps) match the padded batch to 1e-5.
    flatten=True is the (1, R*L) layout used for flash-attention kernels."""
    model = _model(attn)
    rows = _rows(seed=1)
    ref, ref_n = completion_logps(model, collate(rows, pad_id=PAD))
    ref_grads = _grads(model, ref)

    packed = pack(rows, max_tokens_per_row=64, pad_id=PAD)
    assert packed.input_ids.shape[0] < len(rows)  # rows really share
    assert (packed.segment_ids < 0).any()  # and some have padding
    logps, n = packed_forward_logps(model, packed, attn=attn, attention=attention, flatten=flatten)
    assert n.tolist() == ref_n.tolist() == [len(c) for _, c in rows]
    torch.testing.assert_close(logps, ref, rtol=0, atol=1e-5)
    grads = _grads(model, logps)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_without_segment_restarts_segments_leak(attn):
    """Control: the same packed tokens with position_ids 0..L-1 (one causal sequence per row) give
    different log-probs for every segment that does not start its row, so the equality above
    really depends on the block-diagonal mask."""
    model = _model(attn)
    rows = _rows(seed=2)
    packed = pack(rows, max_tokens_per_row=64, pad_id=PAD)
    with torch.no_grad():
        good, _ = packed_forward_logps(model, packed, attn=attn)
        packed.position_ids = torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids)
        bad, _ = packed_forward_logps(model, packed, attn=attn)
    row_start = {int(r[0]) for r in packed.segment_ids}
    later = [i for i in range(len(rows)) if i not in row_start]
    assert later, "the layout must put more than one segment in some row"
    assert ((good - bad)[later].abs() > 1e-3).all()


def test_bad_arguments():
    model = _model("sdpa")
    packed = pack(_rows(seed=3, n=2), max_tokens_per_row=64, pad_id=PAD)
    with pytest.raises(ValueError, match="'auto' or 'mask'"):
        packed_forward_logps(model, packed, attn="sdpa", attention="flex")
