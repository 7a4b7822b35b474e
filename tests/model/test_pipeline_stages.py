"""The pipeline stages in one process, without DeepSpeed: the stage modules run in sequence give the
whole model's packed log-probs; each stage loads only its own tensors; the layer files' names map
back to Hugging Face names; models that cannot be staged are refused with one line."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from megakto.data.packing import pack
from megakto.errors import ModelError
from megakto.model.forward import packed_completion_logps
from megakto.model.pipeline_stages import (DecoderStage, EmbedStage, HeadStage, NormStage, StageSource,
                                           TIED_EMBED, check_pipeline_model, hf_names, hf_to_pipeline,
                                           is_pipeline_name, pipeline_to_hf, stage_specs)

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=64)
ROWS = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14, 15, 16]), ([17], [18, 19, 20, 21, 22])]


def _save(tmp_path, config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    return model


def _run_stages(specs, batch):
    x = (batch.input_ids, batch.position_ids, batch.completion_mask, batch.segment_ids)
    modules = [(s.cls(*s.args), s.forward_fn) for s in specs]
    for module, forward_fn in modules:
        x = forward_fn(module, x) if forward_fn else module(x)
    return x, modules


@pytest.mark.parametrize("tied", [False, True])
def test_stages_in_sequence_equal_the_whole_model(tmp_path, tied):
    config = (Qwen2Config if tied else LlamaConfig)(**SHAPE, tie_word_embeddings=tied)
    model = _save(tmp_path, config)
    batch = pack(ROWS, 32, 0)  # the three sequences in one row: block-diagonal attention
    want, _ = packed_completion_logps(model, batch, attn="sdpa")
    source = StageSource(str(tmp_path), dtype=torch.float32, attn_implementation=None)
    specs = stage_specs(source)
    assert [s.cls for s in specs] == [EmbedStage, DecoderStage, DecoderStage, DecoderStage, NormStage,
                                      EmbedStage if tied else HeadStage]
    assert [s.tie for s in specs] == (["embed", None, None, None, None, "embed"] if tied else [None] * 6)
    # Parameter counts for the partition, from the meta template: the tied head counts the matrix it reuses.
    counts = [sum(p.numel() for p in m.parameters()) for m in (model.model.embed_tokens, *model.model.layers,
                                                               model.model.norm)]
    assert [s.params for s in specs] == counts + [96 * 32]
    got, modules = _run_stages(specs, batch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Each stage holds exactly the model's tensors of its part, under Hugging Face names.
    names = {}
    for index, (module, forward_fn) in enumerate(modules):
        if forward_fn is None:
            names.update(hf_names(index, 3, module.state_dict()))
    whole = dict(model.state_dict())
    if tied:
        whole.pop("lm_head.weight")
    assert sorted(names) == sorted(whole)
    assert all(torch.equal(names[k], whole[k]) for k in whole)


def test_a_stage_reads_only_its_own_tensors(tmp_path, monkeypatch):
    _save(tmp_path, LlamaConfig(**SHAPE, tie_word_embeddings=False))
    source = StageSource(str(tmp_path), dtype=torch.float32, attn_implementation=None)
    source.weight_map()  # the index of names (read once), then the stage's tensors
    import safetensors

    read = []
    original = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            self.fh = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.fh.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    DecoderStage(source, 1)
    assert read and all(k.startswith("model.layers.1.") for k in read)
    assert len(read) == 9  # q, k, v, o, gate, up, down, two norms


def test_hf_names_of_each_layer_kind():
    t = torch.zeros(1)
    assert hf_names(0, 2, {"embed_tokens.weight": t}) == {"model.embed_tokens.weight": t}
    assert hf_names(2, 2, {"layer.mlp.up_proj.weight": t, "rotary.inv_freq": t}) == {"model.layers.1.mlp.up_proj.weight": t}
    assert hf_names(3, 2, {"norm.weight": t}) == {"model.norm.weight": t}
    assert hf_names(4, 2, {"lm_head.weight": t}) == {"lm_head.weight": t}
    with pytest.raises(ModelError, match="pipeline layer 5 does not exist in a model of 2 layers"):
        hf_names(5, 2, {})


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_parameter_names_map_to_hugging_face_names_and_back(tmp_path, tied):
    """The PipelineModule names its layers' parameters ``<layer index>.<attribute>`` (a tied
    embedding :data:`TIED_EMBED`): every one maps to the whole model's parameter of the same shape,
    and back (the universal form across pipeline layouts renames by these)."""
    model = _save(tmp_path, LlamaConfig(**SHAPE, tie_word_embeddings=tied))
    source = StageSource(str(tmp_path), dtype=torch.float32, attn_implementation="eager")
    pipeline = {}
    for index, spec in enumerate(stage_specs(source)):
        for name, param in spec.cls(*spec.args).named_parameters():
            pipeline[TIED_EMBED if spec.tie else f"{index}.{name}"] = param.shape
    whole = {name: p.shape for name, p in model.named_parameters()}
    assert all(is_pipeline_name(n) for n in pipeline) and not any(is_pipeline_name(n) for n in whole)
    assert {pipeline_to_hf(n): shape for n, shape in pipeline.items()} == whole
    assert {hf_to_pipeline(n, 3, tied) for n in whole} == set(pipeline)
    with pytest.raises(ModelError, match="not a parameter of a pipeline stage"):
        hf_to_pipeline("model.embed_tokens.blocks.0.weight", 3)


def test_unsupported_models_are_refused():
    with pytest.raises(ModelError) as err:
        check_pipeline_model(GPT2Config(n_layer=2), 2)
    assert str(err.value) == ("model.path: model_type 'gpt2' with parallel.pp_size=2: pipeline stages are built for "
                              "llama, mistral, qwen2, qwen3; use ZeRO-3 or parallel.tp_size for it")
    with pytest.raises(ModelError) as err:
        check_pipeline_model(LlamaConfig(**{**SHAPE, "num_hidden_layers": 2}), 4, key="ref.path")
    assert str(err.value) == ("ref.path: 2 decoder layers cannot fill parallel.pp_size=4 stages; use "
                              "parallel.pp_size <= 2")
    check_pipeline_model(LlamaConfig(**SHAPE), 3)


def test_weights_without_safetensors_are_refused(tmp_path):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # an older checkpoint's format
    source = StageSource(str(tmp_path), dtype=torch.float32, attn_implementation=None)
    with pytest.raises(ModelError, match=r"no model.safetensors\(.index.json\); pipeline stages load safetensors"):
        NormStage(source)
