"""megakto.model.meta's parameter list from config.json alone, against what a checkpoint records:
the trained module's names and shapes (megakto.trainer's ``param_shapes``), with vocabulary
blocks and peft's LoRA wrappers, reduced to the Hugging Face names (what a resume compares before
it converts a checkpoint)."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from megakto.config import load_config
from megakto.distributed.engine import block_vocab
from megakto.model.lora import apply_lora, base_name
from megakto.model.meta import hf_shapes, param_shapes
from megakto.checkpoint.resume import held_shapes as _param_shapes


def _folder(path, tied):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def test_a_checkpoints_shapes_read_as_the_models_from_its_config(tmp_path):
    """Vocabulary blocks of 32 rows (4 blocks: 32 + 32 + 32 + 4) and LoRA on q_proj with lm_head
    in modules_to_save: the recorded names differ from Hugging Face's, hf_shapes gives them back,
    equal to the meta-device build of the folder; tied embeddings are listed once on both sides."""
    lora = load_config(None, ["model.path=m", "data.train_files=t.jsonl", "model.lora.r=4",
                              "model.lora.target_modules=[q_proj]", "model.lora.modules_to_save=[lm_head]"]).model.lora
    for tied in (False, True):
        path = _folder(tmp_path / f"tied{tied}", tied)
        want = param_shapes(path)
        assert want["model.embed_tokens.weight"] == [100, 32] and ("lm_head.weight" in want) is not tied
        model = AutoModelForCausalLM.from_pretrained(path)
        block_vocab(model, 32, {})
        recorded = _param_shapes(model)
        assert "model.embed_tokens.vocab_blocks.3.weight" in recorded
        assert hf_shapes(recorded) == want
        if not tied:  # peft's modules_to_save copies an untied head only
            recorded = _param_shapes(apply_lora(model, lora, seed=0))
            assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in recorded
            assert hf_shapes(recorded) == want


def test_base_name():
    assert base_name("base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight") == \
        "model.layers.1.self_attn.q_proj.weight"
    assert base_name("base_model.model.lm_head.original_module.weight") == "lm_head.weight"
    assert base_name("base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight") is None
    assert base_name("base_model.model.lm_head.modules_to_save.default.weight") is None
    assert base_name("model.norm.weight") == "model.norm.weight"
