"""Fixtures for the data tests: a tiny in-memory tokenizer and writers for every input format.

The tokenizer is word-level over whitespace, so one word is one token and lengths can be
hand-worked: a plain prompt of n words is n + 1 ids (BOS), a completion of m words is m + 1 ids
(EOS). Its chat templates wrap each message as ``<|role|> content <|end|>``.
"""

import json

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Qwen2Config

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = ("the a cat dog sat ran on in mat hat red blue big small what is why how say "
         "hello hi yes no good bad one two three four five six seven eight nine ten").split()

# Writes BOS itself, so the rendered prompt must not get a second one from the tokenizer.
CHAT_TEMPLATE_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHAT_TEMPLATE_NO_BOS = CHAT_TEMPLATE_WITH_BOS.replace("{{ bos_token }}", "")
# The generation prompt differs from how an assistant turn is rendered: the split must fail.
CHAT_TEMPLATE_BROKEN = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> say {% endif %}")


def build_tokenizer(chat_template=CHAT_TEMPLATE_WITH_BOS, eos=True):
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    kwargs = dict(bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    if eos:
        kwargs["eos_token"] = "</s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.chat_template = chat_template
    return fast


def word_level_qwen2_folder(path, config=True):
    """A Qwen2 model folder whose tokenizer.json is word-level: AutoTokenizer builds Qwen2Tokenizer
    (byte-level BPE) from its vocabulary, which keeps only what is a vocabulary entry after
    byte-level pre-tokenization: punctuation glued to a word, never a word with its space (nor a
    letter inside one, since no single letter is in the vocabulary). ``config=False`` leaves out
    config.json: AutoTokenizer then loads tokenizer.json as written. No pad token either way."""
    words = "what is red blue the hat say hi hello bad ? .".split()
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(str(path))
    if config:
        Qwen2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1).save_pretrained(str(path))
    return str(path)


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Each test gets its own datasets cache and never reaches for the hub."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()


FORMATS = ["jsonl", "json", "csv", "parquet", "disk", "disk_dict"]


def write_rows(path_stem, rows, fmt):
    """Write ``rows`` (list of dicts) as ``fmt``; returns the path to pass to load_rows."""
    path_stem = str(path_stem)
    if fmt == "jsonl":
        path = path_stem + ".jsonl"
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif fmt == "json":
        path = path_stem + ".json"
        with open(path, "w") as f:
            json.dump(rows, f)
    elif fmt == "csv":
        path = path_stem + ".csv"
        datasets.Dataset.from_list(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        path = path_stem + ".parquet"
        datasets.Dataset.from_list(rows).to_parquet(path)
    elif fmt == "disk":
        path = path_stem
        datasets.Dataset.from_list(rows).save_to_disk(path)
    elif fmt == "disk_dict":
        path = path_stem
        ds = datasets.Dataset.from_list(rows)
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(path)
    else:
        raise ValueError(fmt)
    return path


@pytest.fixture
def write(tmp_path):
    """``write(rows, fmt="jsonl", name="train")`` -> path under tmp_path."""
    def _write(rows, fmt="jsonl", name="train"):
        return write_rows(tmp_path / name, rows, fmt)
    return _write
