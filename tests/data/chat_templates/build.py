"""Rebuild the tokenizer folders beside this file: the demo tokenizer (megakto/_demo/) with the
special tokens and chat template of a Llama-3-style and a Qwen-style model.

    python tests/data/chat_templates/build.py

The templates (``*.jinja``) follow the structure of Llama 3.1's and Qwen 2.5's published ones: a
system header, tools as JSON schemas, assistant tool calls as JSON, tool results as their own turn
(``ipython`` in Llama's, inside a user turn in Qwen's). Neither has generation markers, so
megakto finds their assistant tokens by rendering prefixes (megakto/data/conversations.py)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIALS = {
    "llama3_style": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen_style": ["<|im_start|>", "<|im_end|>"],
}


def build(name: str, out: Path) -> None:
    from transformers import AutoTokenizer

    from megakto._demo.data import demo_corpus
    from megakto._demo.tiny_model import _save_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _save_tokenizer(Path(tmp), train_tokenizer(demo_corpus()), 512)
        tok = AutoTokenizer.from_pretrained(tmp)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[name]})
    tok.chat_template = (HERE / f"{name}.jinja").read_text()
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    (out / "tokenizer.model").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[2]))
    for name in SPECIALS:
        build(name, HERE / name)
