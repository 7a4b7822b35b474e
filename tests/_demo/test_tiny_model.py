"""The tiny model folder: loads like any HF checkpoint, is a pure function of its seed, and its
tokenizer and chat template behave the way the data pipeline relies on."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from megakto.errors import ConfigError
from megakto._demo.tiny_model import FAMILIES, make_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def tok(folder):
    return AutoTokenizer.from_pretrained(folder)


def test_model_loads_with_every_weight_and_the_asked_shape(folder, tok):
    """Parameter count by hand for hidden 64, 2 layers, 4 heads of 16, 2 kv heads, mlp 128, vocab V:
    per layer q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288, mlp 3*64*128 = 24576, 2 norms 128
    -> 36992; two layers 73984; final norm 64; untied embed + lm_head 2*64*V."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing, unexpected or mismatched weights
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(tok)
    assert cfg.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert cfg.attention_dropout == 0.0 and cfg.hidden_dropout == 0.0
    assert sum(p.numel() for p in model.parameters()) == 73984 + 64 + 2 * 64 * len(tok)
    ids = torch.tensor([tok("sort: 3 1 2 ->")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_generation_config_names_the_special_ids(folder):
    gen = GenerationConfig.from_pretrained(folder)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 3)


def test_same_seed_same_bytes_other_seed_other_weights(folder, tmp_path):
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    a, b = load_file(folder / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    # Norm weights start at 1 for every seed; every matrix must differ.
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ == {k for k in a if a[k].dim() == 2}
    assert (other / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_global_rng_is_left_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_special_tokens_and_bos(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.pad_token == "<pad>"
    ids = tok("sort: 7 2 9 4 ->")["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids  # one BOS, no EOS
    assert tok("2 4 7 9", add_special_tokens=False)["input_ids"][0] != 1


@pytest.mark.parametrize("text", ["sort: 7 2 9 4 ->", "0 1 3 5 8 9", "Hello, world! é ü 12345"])
def test_round_trip_without_unk(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids  # byte fallback covers characters never seen in training
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_digits_are_single_pieces(tok):
    pieces = tok.tokenize("12345 7")
    assert [p for p in pieces if p.strip("▁")] == ["1", "2", "3", "4", "5", "7"]


def test_chat_template_renders_and_prompt_is_a_prefix(tok):
    messages = [{"role": "user", "content": "sort: 3 1 2 ->"}, {"role": "assistant", "content": "1 2 3"}]
    full = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert full == "<s><|user|>\nsort: 3 1 2 -></s><|assistant|>\n1 2 3</s>"
    assert prompt == "<s><|user|>\nsort: 3 1 2 -></s><|assistant|>\n"
    assert full.startswith(prompt)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] == 2
    completion = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    assert tok.decode(completion) == "1 2 3</s>" and completion[-1] == 2


def test_bad_shapes_name_the_arguments(tmp_path):
    with pytest.raises(ConfigError, match="hidden_size=65 must be a multiple of num_heads=4"):
        make_tiny_model(tmp_path, hidden_size=65)
    with pytest.raises(ConfigError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        make_tiny_model(tmp_path, num_kv_heads=3)
    with pytest.raises(ConfigError, match="vocab_size=100 is below the tokenizer's"):
        make_tiny_model(tmp_path, vocab_size=100)


def test_larger_vocab_pads_the_embedding(tmp_path, tok):
    folder = make_tiny_model(tmp_path, vocab_size=len(tok) + 64)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.model.embed_tokens.weight.shape == (len(tok) + 64, 64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_and_loads(tmp_path, family):
    """Each family of the matrix is a real transformers class of the demo's size and tokenizer."""
    from transformers import AutoConfig

    folder = make_tiny_model(tmp_path / family, family=family)
    config = AutoConfig.from_pretrained(folder)
    want = FAMILIES[family][0].removesuffix("Config").lower().replace("_", "")
    assert config.model_type.replace("_", "") == want
    assert config.vocab_size == 512 and config.hidden_size == 64
    assert config.tie_word_embeddings == (family == "qwen2_tied")


def test_unknown_family_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown family 'gpt5'; choose one of llama"):
        make_tiny_model(tmp_path, family="gpt5")
