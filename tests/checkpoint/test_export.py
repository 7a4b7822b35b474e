"""The HF folder writer on its own (no DeepSpeed checkpoint): a state dict + the run's base files
become a folder that from_pretrained loads with the same weights and logits, tied embeddings and
bf16 included; a state dict that does not fit the config is refused with the names."""

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from megakto.errors import ConfigError
from megakto.checkpoint.export import probe_batch, write_hf_folder


def _tiny(tmp_path, tied):
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    base = tmp_path / "base"
    config.save_pretrained(base)
    (base / "chat_template.jinja").write_text("{{ messages }}")
    # zero_to_fp32 returns parameters by name; a tied lm_head may come without its own entry.
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, base, state


@pytest.mark.parametrize("tied", [False, True])
def test_folder_reloads_exactly(tmp_path, tied):
    model, base, state = _tiny(tmp_path, tied)
    assert ("lm_head.weight" in state) == (not tied)
    out = write_hf_folder(state, str(base), str(tmp_path / "hf"), dtype="float32")
    assert {"config.json", "model.safetensors", "chat_template.jinja"} <= set(os.listdir(out))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = probe_batch(96)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, model(input_ids=batch).logits)
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied


def test_bfloat16_folder_holds_the_rounded_weights(tmp_path):
    _, base, state = _tiny(tmp_path, False)
    out = write_hf_folder(state, str(base), str(tmp_path / "hf"), dtype="bfloat16")
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], v.bfloat16()) for k, v in state.items())
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_mismatched_state_dict_is_refused(tmp_path):
    _, base, state = _tiny(tmp_path, False)
    missing = dict(state)
    del missing["model.norm.weight"]
    with pytest.raises(ConfigError, match=r"model tensors missing from the checkpoint: \['model.norm.weight'\]"):
        write_hf_folder(missing, str(base), str(tmp_path / "a"), dtype="float32")
    extra = {**state, "model.extra.weight": torch.zeros(2)}
    with pytest.raises(ConfigError, match=r"checkpoint tensors the model does not have: \['model.extra.weight'\]"):
        write_hf_folder(extra, str(base), str(tmp_path / "b"), dtype="float32")
    with pytest.raises(ConfigError, match="allowed values are float32, bfloat16, float16"):
        write_hf_folder(state, str(base), str(tmp_path / "c"), dtype="int8")
