"""The tokenizer checks under the real launcher (2 ranks). Both runs stop at start-up, before any
weights are read: the model folder is a Qwen2 config with a word-level tokenizer and no weights."""

import json

import pytest

from tests.data.conftest import word_level_qwen2_folder
from tests.e2e.test_errors import _assert_one_error, _run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

WORDS = [("what is red?", "the red hat", "the blue hat"), ("say hi.", "hello", "bad")]


def _word_rows(path, n_prompts):
    """``n_prompts`` prompts, each with one desirable and one undesirable completion."""
    with open(path, "w") as f:
        for i in range(n_prompts):
            prompt, good, bad = WORDS[i % 2]
            for completion, label in ((good, True), (bad, False)):
                f.write(json.dumps({"prompt": f"{prompt} " + "hi " * i, "completion": completion,
                                    "label": label}) + "\n")
    return str(path)


def test_tokenizer_that_drops_the_words_stops(assets, tmp_path):
    """AutoTokenizer builds Qwen2Tokenizer from the folder, which keeps only punctuation."""
    model = word_level_qwen2_folder(tmp_path / "qwen")
    data = _word_rows(tmp_path / "words.jsonl", 10)
    proc, lines, output = _run(assets, tmp_path, f"model.path={model}", f"data.train_files={data}")
    _assert_one_error(proc, lines, output, f"{data}: row 1: tokenizer Qwen2Tokenizer({model}) drops "
                      'text: completion "the red hat" tokenized to ["<|endoftext|>"]',
                      "20 of 20 completions tokenize to EOS alone")
    assert "rank 1" not in lines[0]


def test_eos_as_pad_token_is_logged_once(assets, tmp_path):
    """The same files without config.json load as written: the text is kept, no warning, and the
    missing pad token is said once. 8 rows < global batch 16 then stops the run."""
    model = word_level_qwen2_folder(tmp_path / "qwen")
    tokenizer = word_level_qwen2_folder(tmp_path / "tok", config=False)
    data = _word_rows(tmp_path / "words.jsonl", 4)
    proc, lines, output = _run(assets, tmp_path, f"model.path={model}",
                               f"model.tokenizer_path={tokenizer}", f"data.train_files={data}")
    _assert_one_error(proc, lines, output, f"{data}: 8 rows after filtering, fewer than "
                      "train.global_batch_size=16")
    assert output.count("has no pad token: padding uses its EOS token '<|endoftext|>' (id 0)") == 1
    assert output.count("tokenizer check: 0 completions only EOS, 0 of 8 paired rows") == 1
    assert "warning:" not in output
