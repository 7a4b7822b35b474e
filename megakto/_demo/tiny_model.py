"""A tiny random-init model folder for the quickstart and the tests, built without any download.

A Llama by default; ``family`` picks another architecture of the same size (:data:`FAMILIES`), so
the tests and the README can run every family megakto claims on the same tokenizer and data.

The folder is an ordinary Hugging Face checkpoint (``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer files with a chat template), so every code path that loads a
real model loads this one too. The tokenizer is a SentencePiece BPE model trained here on the demo
corpus (:func:`megakto._demo.data.demo_corpus`), with byte fallback so that any text still encodes
without ``<unk>``, and digits split into single pieces so numbers tokenize one digit at a time.

Everything is a function of the arguments: the same seed gives the same tensors and the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

from megakto._demo.data import demo_corpus
from megakto.errors import ConfigError

__all__ = ["CHAT_TEMPLATE", "FAMILIES", "TOKENIZER_VOCAB_SIZE", "family_config", "family_settings", "make_tiny_model",
           "train_tokenizer"]

# Special ids follow the Llama convention; pad gets its own id so padding is never mistaken for
# the end of a completion.
_UNK, _BOS, _EOS, _PAD = 0, 1, 2, 3
# 256 byte-fallback pieces + 4 specials leave ~250 learned pieces: plenty for the demo text, and a
# small embedding keeps the model fast on CPU.
TOKENIZER_VOCAB_SIZE = 512

# Each turn ends with eos and nothing after it, so the tokens of an assistant turn end with EOS,
# which is what the data pipeline expects of a completion. The template starts with bos, as Llama
# templates do: apply_chat_template(tokenize=True) adds no special tokens itself, so rendered
# text is tokenized with add_special_tokens=False and plain text with add_special_tokens=True,
# and both get exactly one BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(lines: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE) -> bytes:
    """A serialized SentencePiece BPE model trained on ``lines``."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # A small corpus may not hold enough distinct pieces for the exact size; take what it has.
        hard_vocab_limit=False,
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        # Identity normalization keeps whitespace as written, so the SentencePiece model and the
        # converted tokenizer.json (which has no normalizer) agree on every input.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=_UNK,
        bos_id=_BOS,
        eos_id=_EOS,
        pad_id=_PAD,
        pad_piece="<pad>",
        # Single thread, input order kept: the trained model is the same bytes on every run.
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _save_tokenizer(out: Path, sp_model: bytes, model_max_length: int) -> int:
    """Write tokenizer.model plus the tokenizer.json/tokenizer_config.json/chat_template.jinja that
    AutoTokenizer reads; return the vocabulary size."""
    from transformers import LlamaTokenizer

    sp_path = out / "tokenizer.model"
    sp_path.write_bytes(sp_model)
    # transformers 5 has no SentencePiece-backed LlamaTokenizer: it converts the .model file into a
    # `tokenizers` BPE (Metaspace + byte fallback). Saving that as tokenizer.json means later loads
    # need no conversion. The converter also lists bos/eos/pad as "additional" special tokens,
    # which would only duplicate them in tokenizer_config.json.
    native = LlamaTokenizer.convert_to_native_format(vocab_file=str(sp_path))
    native.pop("additional_special_tokens", None)
    tokenizer = LlamaTokenizer(
        **native,
        pad_token="<pad>",
        # In transformers 5 BOS insertion lives in tokenizer.json's post-processor, which is only
        # written when add_bos_token is passed explicitly.
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    got = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if got != (_UNK, _BOS, _EOS, _PAD):
        raise RuntimeError(f"tokenizer special ids (unk, bos, eos, pad) are {got}, want {(_UNK, _BOS, _EOS, _PAD)}")
    return len(tokenizer)


# family -> (transformers config class, what differs from a Llama of the same shape). Each is what
# makes the family a different case for megakto: q/k norms (Qwen3, OLMo-2), a sliding window
# (Mistral), logit soft-capping and scaled embeddings (Gemma 2), fused qkv and gate_up
# projections (Phi-3), tied embeddings, routed experts (Qwen3-MoE and Mixtral:
# 4 experts, top-2).
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2_tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": None}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": None, "sliding_window": 8, "query_pre_attn_scalar": None,
                                "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": None, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": None, "decoder_sparse_step": 1,
                                     "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def family_settings(family: str, *, head_dim: int, intermediate_size: int) -> dict:
    """The config settings that make ``family`` what it is (:data:`FAMILIES`), the ones left unset
    there filled from the shape: per-head sizes from ``head_dim``, the experts' width half of
    ``intermediate_size``."""
    fill = {"head_dim": head_dim, "query_pre_attn_scalar": head_dim, "moe_intermediate_size": intermediate_size // 2}
    return {k: (fill[k] if v is None else v) for k, v in FAMILIES[family][1].items()}


def family_config(family: str, *, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                  num_heads: int, num_kv_heads: int, max_position_embeddings: int):
    """The transformers config of a tiny ``family`` model (see :data:`FAMILIES`)."""
    import transformers

    if family not in FAMILIES:
        raise ConfigError(f"make_tiny_model: unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    cls_name = FAMILIES[family][0]
    extra = family_settings(family, head_dim=hidden_size // num_heads, intermediate_size=intermediate_size)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=_BOS,
        eos_token_id=_EOS,
        pad_token_id=_PAD,
        # Separate input and output embeddings, like the large models this stands in for, so that
        # sharding and checkpoint code meets the untied case (qwen2_tied is the tied one).
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    kwargs.update(extra)
    return getattr(transformers, cls_name)(**kwargs)


def _check_shape(hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
    if min(hidden_size, num_layers, num_heads, num_kv_heads) < 1:
        raise ConfigError("make_tiny_model: hidden_size, num_layers, num_heads, num_kv_heads must all be >= 1")
    if hidden_size % num_heads:
        raise ConfigError(f"make_tiny_model: hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"make_tiny_model: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 512,
    family: str = "llama",
) -> Path:
    """Write a random-init model folder of ``family`` (default Llama) to ``out_dir`` (created if
    needed) and return its path.

    ``vocab_size`` defaults to the tokenizer's size; a larger value pads the embedding (as real
    checkpoints often do), a smaller one is refused because some token ids would have no row.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise ConfigError(f"make_tiny_model: unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    _check_shape(hidden_size, num_layers, num_heads, num_kv_heads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    n_tokens = _save_tokenizer(out, train_tokenizer(demo_corpus()), max_position_embeddings)
    if vocab_size is None:
        vocab_size = n_tokens
    elif vocab_size < n_tokens:
        raise ConfigError(f"make_tiny_model: vocab_size={vocab_size} is below the tokenizer's {n_tokens} tokens")

    config = family_config(family, vocab_size=vocab_size, hidden_size=hidden_size,
                           intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, max_position_embeddings=max_position_embeddings)
    # Not a field of every family; stored so code that zeroes dropout for KTO finds it in config.json.
    config.hidden_dropout = 0.0

    # Build and initialise on CPU under a private generator state, so the weights depend on
    # `seed` only and the caller's global RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=_PAD, max_new_tokens=32, do_sample=False
    )
    model.save_pretrained(str(out))
    return out

