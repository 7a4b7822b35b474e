"""Sequence parallelism against the model, from config.json before any weights load
(megakto/model/sp_checks.py, megakto/model/families.py): heads and key-value heads against
parallel.sp_size, the attention implementations Ulysses can run packed rows with, and the families
it cannot run. Every refusal is one line naming the key, the value and what to use instead."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from megakto._demo.tiny_model import family_config
from megakto.errors import ConfigError, ModelError
from megakto.model.families import resolve_family_modes
from megakto.model.load import check_model_path, model_settings
from megakto.model.sp_attention import PACKED_SDPA
from megakto.model.sp_checks import check_sp_config, check_sp_reference, sp_attention
from tests.model.test_families import qwen3_next_folder

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             max_position_embeddings=128)


def _llama(heads, kv):
    return LlamaConfig(vocab_size=64, hidden_size=heads * 8, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv)


@pytest.mark.parametrize("heads, kv, sp", [(4, 2, 2), (4, 4, 4), (4, 1, 2), (4, 1, 4), (8, 2, 4), (3, 3, 1)])
def test_heads_that_split(heads, kv, sp):
    check_sp_config(_llama(heads, kv), sp)  # kv=1, sp=2: DeepSpeed replicates the one key-value head


@pytest.mark.parametrize("heads, kv, sp, message", [
    (6, 6, 4, "model.path: parallel.sp_size=4 does not divide the attention heads: num_attention_heads=6; choose a "
     "parallel.sp_size dividing 6"),
    (12, 3, 2, "model.path: parallel.sp_size=2 neither divides the key-value heads nor is a multiple of them: "
     "num_key_value_heads=3; choose a parallel.sp_size dividing 3 or a multiple of it that divides 12"),
    (8, 6, 4, "model.path: parallel.sp_size=4 neither divides the key-value heads nor is a multiple of them: "
     "num_key_value_heads=6; choose a parallel.sp_size dividing 6 or a multiple of it that divides 8"),
])
def test_heads_that_do_not_split(heads, kv, sp, message):
    with pytest.raises(ModelError) as info:
        check_sp_config(_llama(heads, kv), sp)
    assert str(info.value) == message


def test_model_folder_heads_are_checked_with_the_key(tmp_path):
    _llama(6, 6).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=rf"^model.path={tmp_path}: parallel.sp_size=4 does not divide"):
        check_model_path(str(tmp_path), key="model.path", trust_remote_code=False, sp=4)
    assert check_model_path(str(tmp_path), key="model.path", trust_remote_code=False, sp=2).num_attention_heads == 6


@pytest.mark.parametrize("setting, on_gpu, want", [
    ("auto", False, PACKED_SDPA), ("auto", True, "flash_attention_2"), (PACKED_SDPA, True, PACKED_SDPA),
    ("flash_attention_2", True, "flash_attention_2"), ("flash_attention_3", True, "flash_attention_3"),
])
def test_attention_under_sequence_parallelism(setting, on_gpu, want):
    assert sp_attention(setting, 2, on_gpu=on_gpu) == want


@pytest.mark.parametrize("setting", ["sdpa", "flex_attention", "eager"])
def test_masking_attention_is_refused(setting):
    with pytest.raises(ConfigError) as info:
        sp_attention(setting, 2, on_gpu=False)
    assert str(info.value) == (
        f"model.attn_implementation={setting} with parallel.sp_size=2: Ulysses drops the attention mask, so {setting} "
        "would let packed sequences and padding attend to each other; use flash_attention_2 (GPU: varlen from "
        "position_ids) or packed_sdpa (sdpa over each packed sequence found from position_ids: CPU), or auto for the "
        "device's choice")


def test_packed_sdpa_is_for_sequence_parallelism_only():
    assert sp_attention("sdpa", 1, on_gpu=False) == "sdpa" and sp_attention("auto", 1, on_gpu=True) == "auto"
    with pytest.raises(ConfigError) as info:
        sp_attention(PACKED_SDPA, 1, on_gpu=False)
    assert str(info.value) == ("model.attn_implementation=packed_sdpa is the core attention of sequence parallelism "
                               "(parallel.sp_size > 1); without it use auto or sdpa")


def _folder(tmp_path, family):
    path = tmp_path / family
    family_config(family, **SHAPE).save_pretrained(path)
    return str(path)


def test_families_that_run_sequence_parallel(tmp_path):
    for family in ("llama", "qwen3", "mistral", "qwen3_moe"):
        got = model_settings(_folder(tmp_path, family), attn_implementation=sp_attention("auto", 2, on_gpu=False),
                             logps="auto", trust_remote_code=False, sp=2)
        assert (got.attn, got.logps) == (PACKED_SDPA, "chunked"), family


def test_soft_capped_family_is_refused(tmp_path):
    path = "models/gemma2"
    with torch.device("meta"):  # Gemma 2 runs neither sdpa nor packed_sdpa; the family refusal stands on its own
        model = AutoModelForCausalLM.from_config(family_config("gemma2", **SHAPE), attn_implementation="eager")
    with pytest.raises(ConfigError) as info:
        resolve_family_modes(model, key="model.path", path=path, logps="auto", tp=1, pp=1, packing=True, sp=2)
    assert str(info.value) == (
        f"Gemma2ForCausalLM (model.path={path}) cannot run with parallel.sp_size=2: it changes the logits after the "
        "output head (final_logit_softcapping=30.0), and each rank scores its shard of the sequence with the chunked "
        "head, which reads the head's own output; set parallel.sp_size=1")


def test_hybrid_linear_attention_is_refused_packed_or_not(tmp_path):
    path = qwen3_next_folder(tmp_path)
    for packing in (True, False):
        with pytest.raises(ConfigError) as info:
            model_settings(str(path), attn_implementation=PACKED_SDPA, logps="auto", trust_remote_code=False, sp=2,
                           packing=packing)
        assert str(info.value) == (
            f"Qwen3NextForCausalLM (model.path={path}) cannot run with parallel.sp_size=2: its linear_attention layers "
            "mix tokens along the sequence outside attention, and Ulysses splits only the attention (each rank would "
            "run them over its own shard); set parallel.sp_size=1")


def test_reference_needs_the_policys_attention_shape():
    """One Ulysses attention per process, of the policy's head geometry, serves both models."""
    check_sp_reference(_llama(4, 2), _llama(4, 2), 2)
    check_sp_reference(_llama(4, 2), _llama(3, 3), 1)  # no sequence parallelism: anything goes
    with pytest.raises(ModelError) as info:
        check_sp_reference(_llama(4, 2), _llama(8, 2), 2, key="ref.path=models/big")
    assert str(info.value) == (
        "ref.path=models/big: parallel.sp_size=2 runs policy and reference through one Ulysses attention of the "
        "policy's shape (attention heads 4, key-value heads 2, head_dim 8), but the reference has attention heads 8, "
        "key-value heads 2, head_dim 8; use a reference of the policy's architecture")
