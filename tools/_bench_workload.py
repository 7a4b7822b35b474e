"""The benchmark's workload: a random-init Llama folder, a word-level tokenizer and KTO rows whose
token lengths are known exactly, all made locally from a seed (nothing is downloaded).

The tokenizer maps each made-up word ``w<i>`` to one id, so a row's prompt of P words is exactly
1 + P tokens (BOS first) and a completion of C words is exactly C + 1 target tokens (EOS last), in
megakto (which tokenizes prompt and completion apart) and in TRL (which tokenizes prompt +
completion together). Lengths are then controlled by the data alone, and the vocabulary size by a
single argument, which is what the memory-vs-vocabulary check varies.

The model is a Llama (hidden 256, 4 layers) unless a family and shape are given: ``qwen3`` with
Qwen3-0.6B's shape is what tools/gpu_check.sh trains (:data:`FAMILIES`, :func:`add_model_args`);
``qwen3_moe`` is the demo's tiny mixture of experts (megakto/_demo/tiny_model.py: every layer a MoE
block, top-2 routing, expert width half of ``--intermediate``) with ``--experts`` experts.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["FAMILIES", "SPECIALS", "Workload", "add_model_args", "build_tokenizer", "make_rows", "model_shape",
           "target_tokens", "write_model", "write_workload"]

# Llama-style special tokens; pad has its own id so padding is never read as the end of a completion.
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
_PAD, _UNK, _BOS, _EOS = range(4)

# family -> (config class name, tied embedding and output head). Qwen3 ties them, as Qwen3-0.6B does.
FAMILIES = {"llama": ("LlamaConfig", False), "qwen3": ("Qwen3Config", True), "qwen3_moe": ("Qwen3MoeConfig", False)}


@dataclass
class Workload:
    """What :func:`write_workload` wrote, as plain values (it travels to the workers as JSON)."""

    model_dir: str
    data_file: str
    vocab_size: int
    n_rows: int
    n_params: int
    seed: int
    prompt_words: tuple[int, int]
    completion_words: tuple[int, int]
    model_shape: dict
    target_tokens: list[int]  # per row, in file order: completion words + EOS

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer(vocab_size: int):
    """A ``PreTrainedTokenizerFast`` over ``vocab_size`` ids: 4 specials plus words ``w4 .. w<V-1>``
    (a word's number is its id), whitespace-split, BOS prepended by the post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIALS) + 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for words after {len(SPECIALS)} specials")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[_UNK]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Registered as special so "...w7</s>" (TRL appends the EOS text with no space) splits off "</s>".
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[_BOS]} $A", pair=f"{SPECIALS[_BOS]} $A $B",
        special_tokens=[(SPECIALS[_BOS], _BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[_PAD], unk_token=SPECIALS[_UNK],
                                   bos_token=SPECIALS[_BOS], eos_token=SPECIALS[_EOS], model_max_length=512)


def make_rows(n_rows: int, vocab_size: int, *, seed: int, prompt_words: tuple[int, int] = (5, 250),
              completion_words: tuple[int, int] = (5, 250)) -> list[dict]:
    """``n_rows`` KTO rows of random words; prompt and completion lengths uniform in the inclusive
    ranges, independently, so prompt + completion spreads over about 10-500 tokens. Exactly half
    the rows (rounded down) are desirable, in shuffled order. Every prompt is distinct."""
    rng = random.Random(seed)
    first, last = len(SPECIALS), vocab_size - 1
    labels = [i < n_rows // 2 for i in range(n_rows)]
    rng.shuffle(labels)
    rows, seen = [], set()
    for label in labels:
        while True:
            prompt = " ".join(f"w{rng.randint(first, last)}" for _ in range(rng.randint(*prompt_words)))
            if prompt not in seen:
                break
        seen.add(prompt)
        completion = " ".join(f"w{rng.randint(first, last)}" for _ in range(rng.randint(*completion_words)))
        # The leading space keeps the word boundary when TRL concatenates prompt + completion.
        rows.append({"prompt": prompt, "completion": " " + completion, "label": label})
    return rows


def target_tokens(row: dict) -> int:
    """Completion tokens of a row as both trainers score them: its words plus the EOS."""
    return len(row["completion"].split()) + 1


def add_model_args(parser) -> None:
    """The workload model's family and shape as command-line flags (defaults: the benchmark's Llama);
    :func:`model_shape` turns the parsed arguments into :func:`write_model`'s keywords."""
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama", help="model class of the workload")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=None, help="per-head size (default: hidden / heads)")
    parser.add_argument("--intermediate", type=int, default=688, help="MLP intermediate size")
    parser.add_argument("--experts", type=int, default=8, help="routed experts per layer (--family qwen3_moe)")


def model_shape(args) -> dict:
    """:func:`write_model`'s shape keywords from :func:`add_model_args`'s parsed flags."""
    return dict(family=args.family, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                num_kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate_size=args.intermediate,
                **({"num_experts": args.experts} if args.family == "qwen3_moe" else {}))


def write_model(model_dir: str | Path, *, vocab_size: int, seed: int, longest: int, family: str = "llama",
                hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int | None = None,
                head_dim: int | None = None, intermediate_size: int = 688,
                num_experts: int | None = None) -> tuple[int, dict]:
    """A random-init model of ``family`` (seeded) and :func:`build_tokenizer`'s tokenizer in
    ``model_dir``, with positions for ``longest`` tokens; returns (parameters, shape).
    ``num_experts``: the routed experts of a ``qwen3_moe`` (default the demo family's)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {sorted(FAMILIES)}")
    config_class, tied = FAMILIES[family]
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    shape = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                 num_key_value_heads=num_kv_heads or num_heads, intermediate_size=intermediate_size,
                 max_position_embeddings=max(512, longest))
    if head_dim is not None:
        shape["head_dim"] = head_dim
    if family == "qwen3_moe":
        shape.update(_moe_settings(hidden_size // num_heads if head_dim is None else head_dim, intermediate_size,
                                   num_experts))
    config = getattr(transformers, config_class)(
        vocab_size=vocab_size, bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=_PAD, tie_word_embeddings=tied,
        attention_dropout=0.0, **shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(model_dir))
    build_tokenizer(vocab_size).save_pretrained(str(model_dir))
    return sum(p.numel() for p in model.parameters()), {"family": family, **shape}


def _moe_settings(head_dim: int, intermediate_size: int, num_experts: int | None) -> dict:
    """The demo's ``qwen3_moe`` settings (megakto/_demo/tiny_model.py), with ``num_experts`` experts
    when given."""
    from megakto._demo.tiny_model import family_settings

    settings = family_settings("qwen3_moe", head_dim=head_dim, intermediate_size=intermediate_size)
    return {**settings, **({"num_experts": num_experts} if num_experts else {})}


def write_workload(out_dir: str | Path, *, vocab_size: int = 32000, n_rows: int = 64, seed: int = 0,
                   prompt_words: tuple[int, int] = (5, 250), completion_words: tuple[int, int] = (5, 250),
                   **shape) -> Workload:
    """Write ``out_dir/model`` (HF folder: config, safetensors, tokenizer) and ``out_dir/train.jsonl``;
    ``shape``: :func:`write_model`'s family and shape keywords (:func:`model_shape`)."""
    out = Path(out_dir)
    model_dir, data_file = out / "model", out / "train.jsonl"
    n_params, shape = write_model(model_dir, vocab_size=vocab_size, seed=seed,
                                  longest=1 + prompt_words[1] + completion_words[1] + 1, **shape)
    rows = make_rows(n_rows, vocab_size, seed=seed, prompt_words=prompt_words, completion_words=completion_words)
    with open(data_file, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return Workload(model_dir=str(model_dir), data_file=str(data_file), vocab_size=vocab_size, n_rows=n_rows,
                    n_params=n_params, seed=seed, prompt_words=tuple(prompt_words),
                    completion_words=tuple(completion_words), model_shape=shape,
                    target_tokens=[target_tokens(r) for r in rows])
