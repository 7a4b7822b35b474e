"""The trainer's log-prob path (packed rows, chunked head) equals the ground truth (padded rows,
full logits, sequence_logps) in values and in gradients of every parameter."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megakto.data.collate import collate
from megakto.data.packing import pack
from megakto.model.forward import completion_logps, packed_completion_logps

PAD = 0


def _model(tie: bool, attn: str = "sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def _rows(seed=1, n=7):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = torch.randint(1, 301, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(1, 301, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append((p, c))
    return rows


def ground_truth(model, rows):
    """Padded rows, full logits: the summed completion log-probs, token counts and the gradient of
    their sum for every parameter (the model's grads are cleared afterwards)."""
    ref, ref_n = completion_logps(model, collate(rows, pad_id=PAD))
    ref.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return ref, ref_n, grads


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode,chunk", [("chunked", 3), ("chunked", None), ("full", None)])
@pytest.mark.parametrize("budget", [20, 64])
def test_packed_equals_padded(tie, mode, chunk, budget):
    rows = _rows()
    model = _model(tie)
    ref, ref_n, ref_grads = ground_truth(model, rows)
    packed = pack(rows, budget, PAD)
    assert packed.input_ids.shape[0] < len(rows)  # really packed: several sequences share a row
    got, got_n = packed_completion_logps(model, packed, attn="sdpa", mode=mode, chunk_tokens=chunk)
    got.sum().backward()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert got_n.tolist() == ref_n.tolist() == [len(c) for _, c in rows]
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)


def test_pad_rows_layout_equals_padded():
    """data.packing=false: one sequence per row in the packed representation, same numbers."""
    from megakto.data.packing import pad_rows

    rows = _rows(seed=3)
    model = _model(False)
    ref, _ = completion_logps(model, collate(rows, pad_id=PAD))
    batch = pad_rows(rows, PAD)
    assert batch.input_ids.shape[0] == len(rows)
    got, n = packed_completion_logps(model, batch, attn="sdpa")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert n.tolist() == [len(c) for _, c in rows]
