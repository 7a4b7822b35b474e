"""LoRA in one process: the adapters' init is the seed's (every rank and every run the same), B = 0
so the policy starts as the reference, adapters off give the base model exactly, and the config
combinations LoRA refuses are one line each."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from megakto.config import load_config
from megakto.errors import ConfigError
from megakto.model.lora import apply_lora, is_lora

REQUIRED = ["model.path=m", "data.train_files=t.jsonl"]


def _model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def _lora(**overrides):
    return load_config(None, REQUIRED + ["model.lora.r=4"] + [f"model.lora.{k}={v}" for k, v in overrides.items()]).model.lora


def test_adapters_are_the_seeds_and_start_as_the_base_model():
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    base = _model().eval()
    with torch.no_grad():
        want = base(input_ids=ids).logits
    a, b, c = (apply_lora(_model(), _lora(), seed=s).eval() for s in (7, 7, 8))
    assert is_lora(a) and not is_lora(base)
    sd = [dict(m.named_parameters()) for m in (a, b, c)]
    lora_a = [k for k in sd[0] if ".lora_A." in k]
    assert len(lora_a) == 2 * 7 and all(torch.equal(sd[0][k], sd[1][k]) for k in lora_a)
    assert not all(torch.equal(sd[0][k], sd[2][k]) for k in lora_a)
    assert all(float(sd[0][k.replace("lora_A", "lora_B")].abs().max()) == 0 for k in lora_a)
    assert {k for k, p in sd[0].items() if p.requires_grad} == {k for k in sd[0] if ".lora_" in k}
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, want, rtol=0, atol=0)
        for k in lora_a:
            sd[0][k.replace("lora_A", "lora_B")].normal_()  # a trained adapter
        moved = a(input_ids=ids).logits
        with a.disable_adapter():
            off = a(input_ids=ids).logits
    assert float((moved - want).abs().max()) > 1e-3
    torch.testing.assert_close(off, want, rtol=0, atol=0)


@pytest.mark.parametrize("overrides, expected", [
    (["model.lora.r=8", "parallel.tp_size=2"],
     "model.lora.r=8 with parallel.tp_size=2, parallel.pp_size=1: LoRA runs under ZeRO 0-3 only (DeepSpeed's "
     "AutoTP and the pipeline stages do not carry peft adapters); set parallel.tp_size=1 and parallel.pp_size=1"),
    (["model.lora.r=8", "model.lora.target_modules=q_proj,lm_head"],
     "model.lora.target_modules=q_proj,lm_head: adapters on ['lm_head'] are not supported (the chunked log-probs "
     "and vocabulary blocks read the whole matrix); adapt the attention and MLP projections, or list the module "
     "in model.lora.modules_to_save"),
    (["model.lora.r=-1"], "model.lora.r must be >= 0 (0 = off), got -1"),
    (["model.lora.r=8", "model.lora.dropout=1.0"],
     "model.lora: alpha must be > 0, dropout in [0, 1) and target_modules non-empty; got alpha=16.0, dropout=1.0, "
     "target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']"),
])
def test_refused_combinations(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, REQUIRED + overrides)
    assert str(err.value) == expected


def test_export_merges_in_fp32_and_names_the_real_base(tmp_path):
    """A bf16 export: the merged weights are W + (alpha / r) B A computed in fp32 and then rounded
    (rounding first would lose the small update), and the adapter's config names the run's base
    model, not the checkpoint's weightless hf_base folder."""
    from safetensors.torch import load_file

    from megakto.checkpoint.export import write_lora_folders

    base_dir = tmp_path / "hf_base"
    model = apply_lora(_model(), _lora(alpha=8), seed=3)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            with torch.no_grad():
                p.normal_(std=1e-3)  # a small trained update
    model.peft_config["default"].base_model_name_or_path = "/models/the-base"
    model.base_model.model.config.save_pretrained(base_dir)
    model.peft_config["default"].save_pretrained(base_dir)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_lora_folders(state, str(base_dir), str(tmp_path / "hf"), str(tmp_path / "adapter"), dtype="bfloat16")
    merged = load_file(str(tmp_path / "hf" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    a = state[f"base_model.model.{key}.lora_A.default.weight"]
    b = state[f"base_model.model.{key}.lora_B.default.weight"]
    w = state[f"base_model.model.{key}.base_layer.weight"]
    assert merged[f"{key}.weight"].dtype == torch.bfloat16
    assert torch.equal(merged[f"{key}.weight"], (w + 2.0 * b @ a).to(torch.bfloat16))
    import json

    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == "/models/the-base"
