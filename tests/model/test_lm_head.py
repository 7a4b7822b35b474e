"""The swapped output head (megakto.model.lm_head) behind packed_completion_logps: against the
full-logits ground truth (megakto.model.forward.completion_logps on collate batches), on a tiny
random Llama with untied and tied output embeddings, then inside real ZeRO-3 engines (2 ranks)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megakto.data.collate import collate
from megakto.data.packing import pack, pad_rows
from megakto.errors import ModelError
from megakto.model.forward import completion_logps, packed_completion_logps  # completion_logps: ground truth
from tests.launcher import launch

PAD = 0
# Different prompt/completion lengths and right padding (pad id 0 is also a real token id).
ROWS = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14, 15, 16, 17, 18, 300]), ([19, 20, 21, 22], [23])]


def _tiny(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=301, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_tokens", [2, 1024])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_values_and_all_grads_match_full_logits(tie, chunk_tokens, layout):
    model = _tiny(tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    batch = pack(ROWS, 12, PAD) if layout == "packed" else pad_rows(ROWS, PAD)
    assert batch.input_ids.shape[0] == (2 if layout == "packed" else 3)
    upstream = torch.tensor([1.0, -0.7, 0.3])  # signed per-sequence weights, like eq. (7)'s v(x, y)
    ref, ref_n = completion_logps(model, collate(ROWS, pad_id=PAD))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), list(model.parameters()))
    out, n = packed_completion_logps(model, batch, attn="sdpa", chunk_tokens=chunk_tokens)
    grads = torch.autograd.grad((out * upstream).sum(), list(model.parameters()))
    assert n.tolist() == ref_n.tolist() == [4, 7, 1]
    assert out.shape == (3,) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert "forward" not in model.lm_head.__dict__  # the head is its plain nn.Linear again
    assert model(input_ids=batch.input_ids).logits.shape == (*batch.input_ids.shape, 301)


def test_prompt_and_padding_positions_are_never_projected():
    """NaN final hidden states outside the scored positions (prompt, last token of a segment,
    padding) change nothing, and every parameter's gradient stays the clean one."""
    model = _tiny(False)
    batch = pack(ROWS, 12, PAD)
    clean, _ = packed_completion_logps(model, batch, attn="sdpa", chunk_tokens=3)
    clean_grads = torch.autograd.grad(clean.sum(), list(model.parameters()))
    # Position t is scored when t + 1 is a completion token of the same segment.
    seg = batch.segment_ids
    scored = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    scored[:, :-1] = (batch.completion_mask[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
    assert int(scored.sum()) == 4 + 7 + 1
    poison = model.model.norm.register_forward_hook(
        lambda module, args, out: torch.where(scored.unsqueeze(-1), out, float("nan")))
    try:
        logps, _ = packed_completion_logps(model, batch, attn="sdpa", chunk_tokens=3)
        grads = torch.autograd.grad(logps.sum(), list(model.parameters()))
    finally:
        poison.remove()
    torch.testing.assert_close(logps, clean)
    for (name, _), g, cg in zip(model.named_parameters(), grads, clean_grads):
        torch.testing.assert_close(g, cg, msg=lambda m: f"{name}: {m}")


class _ScaledLogits(LlamaForCausalLM):
    """Post-processes the head's output (as Cohere's logit_scale or Gemma's soft-capping do)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_refuses_models_that_change_logits_after_the_head():
    model = _tiny(False)
    scaled = _ScaledLogits(model.config)
    scaled.load_state_dict(model.state_dict())
    with pytest.raises(ModelError, match="does not return its output head's result unchanged.*set model.logps=full"):
        packed_completion_logps(scaled, pack(ROWS, 12, PAD), attn="sdpa")
    assert "forward" not in scaled.lm_head.__dict__  # restored after the failure too
    # The full-logits mode is the way out: it matches the ground truth of the scaled model.
    full, _ = packed_completion_logps(scaled, pack(ROWS, 12, PAD), attn="sdpa", mode="full")
    ref, _ = completion_logps(scaled, collate(ROWS, pad_id=PAD))
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["layer", "head_row"])
def test_nan_weights_give_nan_logps_not_a_modified_head_error(where):
    """NaN in the weights makes NaN logits: the head's result and the model's output are both NaN
    there, which torch.equal calls different. That must come back as NaN log-probs (the trainer
    then skips and counts the step), never as "does not return its output head's result
    unchanged ... set model.logps=full"."""
    model = _tiny(False)
    with torch.no_grad():
        if where == "layer":  # every hidden state, so every log-prob, becomes NaN
            model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
        else:  # one vocabulary row: every logsumexp, so every log-prob, becomes NaN
            model.lm_head.weight[7, 0] = float("nan")
    out, n = packed_completion_logps(model, pack(ROWS, 12, PAD), attn="sdpa", chunk_tokens=3)
    full, _ = packed_completion_logps(model, pack(ROWS, 12, PAD), attn="sdpa", mode="full")
    assert n.tolist() == [4, 7, 1]
    assert torch.isnan(out).all() and torch.isnan(full).all()


def test_a_head_result_changed_with_nan_elsewhere_is_still_refused():
    """NaN in one sequence's log-prob (a hidden state poisoned at one scored position) and a
    changed result elsewhere: still the modified-head error, NaN does not hide it."""
    model = _tiny(False)
    scaled = _ScaledLogits(model.config)
    scaled.load_state_dict(model.state_dict())
    batch = pack(ROWS, 12, PAD)
    poison = scaled.model.norm.register_forward_hook(
        lambda module, args, out: torch.cat([out[:, :3].clone().fill_(float("nan")), out[:, 3:]], dim=1))
    try:
        with pytest.raises(ModelError, match="does not return its output head's result unchanged"):
            packed_completion_logps(scaled, batch, attn="sdpa")
    finally:
        poison.remove()


def test_restores_a_forward_already_patched_on_the_head():
    model = _tiny(False)
    patched = model.lm_head.forward
    model.lm_head.forward = patched  # an instance attribute, as accelerate-style hooks leave it
    packed_completion_logps(model, pack(ROWS, 12, PAD), attn="sdpa")
    assert model.lm_head.__dict__["forward"] is patched


def test_engine_like_wrapper_is_unwrapped():
    """A DeepSpeed engine exposes the HF model as ``.module`` and is itself called."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            return self.module(**kw)

    model = _tiny(False)
    ref, _ = completion_logps(model, collate(ROWS, pad_id=PAD))
    out, _ = packed_completion_logps(Wrapper(model), pack(ROWS, 12, PAD), attn="sdpa")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert "forward" not in model.lm_head.__dict__


@pytest.mark.gloo
def test_zero3_two_ranks_same_logps_and_same_post_step_weights(tmp_path):
    """Two ZeRO-3 engines (every parameter partitioned) from the same init, two AdamW steps on each
    rank's own batches: one through full logits on padded rows, one through the chunked head on
    packed rows; and a third loaded through from_pretrained under zero.Init with its vocabulary
    matrices split into 128-row blocks (3 blocks, each its own partitioned parameter), through the
    blocked chunked head. Log-probs agree to fp32 rounding; weights agree to 1e-4 (Adam divides by sqrt(v),
    so float-rounding differences in near-zero grads grow to ~1e-5 here, still 200x below the
    lr=1e-2 update they are part of)."""
    proc = launch("tests/model/_zero3_lm_head_worker.py", ["--out", str(tmp_path)], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        dump = torch.load(tmp_path / f"rank{rank}.pt")
        for key in ("tie=False", "tie=True"):
            d = dump[key]
            assert d["partitioned"] == (True, True), key  # lm_head empty outside forward, sliced
            assert d["forward_restored"]
            for step in d["steps"]:
                assert step["packed_rows"] < step["n_full"].numel()  # really packed
                assert step["n_full"].tolist() == step["n_chunked"].tolist()
                torch.testing.assert_close(step["chunked"], step["full"], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(step["blocked"], step["full"], rtol=1e-5, atol=1e-5)
            # 3 blocks of the embedding (+ 3 of the head unless tied), all partitioned
            assert d["vocab_blocks"] == (3 if key == "tie=True" else 6, True), key
            # gathered_state_dict joins the blocks back under the HF names
            assert sorted(d["full"]) == sorted(d["chunked"]) == sorted(d["blocked"]) == sorted(d["init"])
            for name in d["full"]:
                torch.testing.assert_close(d["chunked"][name], d["full"][name], rtol=0, atol=1e-4)
                torch.testing.assert_close(d["blocked"][name], d["full"][name], rtol=0, atol=1e-4)
                # and training really moved every parameter (a step of ~lr), head included
                assert (d["full"][name] - d["init"][name]).abs().max() > 5e-3, name
