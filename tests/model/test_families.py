"""Each model family against each mode, decided from config.json before any weights load
(megakto/model/families.py): ``model.logps=auto`` resolves per family, the modes a family cannot
run are one line naming the family, the mode and what to use instead, and MoE blocks are found
for ZeRO-3's leaf-module setting."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from megakto._demo.tiny_model import FAMILIES, family_config
from megakto.errors import ConfigError
from megakto.model.families import moe_block_classes, sequence_mixers
from megakto.model.load import model_settings

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             max_position_embeddings=128)


def _folder(tmp_path, family):
    path = tmp_path / family
    family_config(family, **SHAPE).save_pretrained(path)
    return str(path)


def _settings(path, **kw):
    kw = {"attn_implementation": "auto", "logps": "auto", "trust_remote_code": False, **kw}
    return model_settings(path, **kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_auto_logps_is_chunked_unless_the_family_changes_its_logits(tmp_path, family):
    got = _settings(_folder(tmp_path, family))
    if family == "gemma2":
        assert got.logps == "full"
        assert got.notes == ["log-probs: full (model.logps=auto: Gemma2ForCausalLM changes the logits after the "
                             "output head, final_logit_softcapping=30.0, which chunked log-probs would skip)"]
    else:
        assert (got.logps, got.notes) == ("chunked", [])


@pytest.mark.parametrize("mode, text", [({"tp": 2}, "parallel.tp_size=2"), ({"pp": 2}, "parallel.pp_size=2")])
def test_soft_capped_family_refused_under_tp_and_pp(tmp_path, mode, text):
    path = _folder(tmp_path, "gemma2")
    with pytest.raises(ConfigError) as info:
        _settings(path, **mode)
    assert str(info.value) == (
        f"Gemma2ForCausalLM (model.path={path}) cannot run with {text}: it changes the logits after the output "
        f"head (final_logit_softcapping=30.0), and {text} scores with the chunked vocabulary-parallel head, which "
        "reads the head's own output; run it under ZeRO-3 (parallel.tp_size=1, parallel.pp_size=1)")


def test_other_families_pass_tp_and_pp(tmp_path):
    for family in ("llama", "qwen3", "phi3", "olmo2", "qwen3_moe"):
        assert _settings(_folder(tmp_path, family), tp=2).logps == "chunked"


def test_chunked_on_a_soft_capped_reference_is_refused_with_its_key(tmp_path):
    llama, gemma = _folder(tmp_path, "llama"), _folder(tmp_path, "gemma2")
    assert _settings(llama, ref_path=gemma).logps == "full"  # one function scores both: full serves both
    with pytest.raises(ConfigError, match=rf"\(ref.path={gemma}\)"):
        _settings(llama, ref_path=gemma, logps="chunked")


def qwen3_next_folder(tmp_path):
    """A tiny Qwen3-Next (Gated DeltaNet linear attention beside full attention) config folder."""
    from transformers import Qwen3NextConfig

    path = tmp_path / "qwen3_next"
    Qwen3NextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=16, linear_value_head_dim=16).save_pretrained(path)
    return path


def test_hybrid_linear_attention_refuses_packing(tmp_path):
    path = qwen3_next_folder(tmp_path)
    with pytest.raises(ConfigError) as info:
        _settings(str(path))
    assert str(info.value) == (
        f"data.packing=true cannot be used with Qwen3NextForCausalLM (model.path={path}): its linear_attention "
        "layers mix tokens along the sequence outside attention, so packed rows would leak into each other; set "
        "data.packing=false (one right-padded sequence per row)")
    assert _settings(str(path), packing=False).logps == "chunked"


def test_attention_only_families_have_no_other_mixers():
    for family in FAMILIES:
        assert sequence_mixers(family_config(family, **SHAPE)) == [], family


def test_moe_block_classes():
    with torch.device("meta"):
        moe = AutoModelForCausalLM.from_config(family_config("qwen3_moe", **SHAPE))
        dense = AutoModelForCausalLM.from_config(family_config("qwen3", **SHAPE))
    assert [c.__name__ for c in moe_block_classes(moe)] == ["Qwen3MoeSparseMoeBlock"]
    assert moe_block_classes(dense) == []


def test_router_aux_coef_defaults_to_the_model_config_and_is_refused_on_dense_models(tmp_path):
    """kto.router_aux_coef: null takes the MoE config's router_aux_loss_coef (Qwen3-MoE: 0.001) and
    logs it; 0 turns it off; a dense model resolves null to 0 and refuses a non-zero value."""
    moe, dense = _folder(tmp_path, "qwen3_moe"), _folder(tmp_path, "llama")
    got = _settings(moe, router_aux=None)
    assert got.router_aux_coef == 0.001
    assert got.notes == ["router balancing loss: kto.router_aux_coef=0.001 (the model config's router_aux_loss_coef), "
                         "top-2 routing, over the target rows' tokens"]
    assert _settings(moe, router_aux=0.05).router_aux_coef == 0.05
    assert _settings(moe, router_aux=0.05).notes == ["router balancing loss: kto.router_aux_coef=0.05, top-2 routing, "
                                                     "over the target rows' tokens"]
    assert (_settings(moe, router_aux=0.0).router_aux_coef, _settings(moe, router_aux=0.0).notes) == (0.0, [])
    assert _settings(dense, router_aux=None).router_aux_coef == 0.0
    with pytest.raises(ConfigError) as info:
        _settings(dense, router_aux=0.01)
    assert str(info.value) == (f"kto.router_aux_coef=0.01 is the balancing loss of a mixture-of-experts router, but "
                               f"LlamaForCausalLM (model.path={dense}) has no routed experts; remove it or set 0")
    # The reference's family plays no part: a dense policy beside a MoE reference stays at 0.
    assert _settings(dense, ref_path=moe, router_aux=None).router_aux_coef == 0.0
