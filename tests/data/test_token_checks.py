"""Text the tokenizer drops, and completions max_length cuts, are counted, warned about and (when
most rows are hit) stop the run with the tokenizer class and an example row."""

import json

import numpy as np
import pytest
from tokenizers import normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megakto.data import _token_checks as checks
from megakto.data.rows import load_rows
from megakto.data.tokenize import tokenize_rows
from megakto.errors import DataError
from tests.data.conftest import build_tokenizer, word_level_qwen2_folder

# helpers: hand-worked


def test_chars_lost_counts_missing_characters_only():
    """'Héllo wörld' has 10 non-space characters; the decode lacks é and ö. Extra characters in a
    decode (BOS, spaces) are not a loss; NFKC makes the ligature 'ﬁ' equal to 'fi'."""
    assert checks.chars_lost("Héllo wörld", "Hllo wrld") == (10, 2)
    assert checks.chars_lost("abc", "<s> a  b c") == (3, 0)
    assert checks.chars_lost("ﬁne", "fine") == (4, 0)
    assert checks.chars_lost("aab", "ab") == (3, 1)


def test_identical_pairs_needs_the_other_label_and_another_text():
    """Prompt 1: rows 0 (T) and 1 (F) have the same ids and different texts: both count. Row 2 (F)
    has row 0's ids and text: the same text is not a tokenizer loss, but row 0 still counts. Prompt
    2 has one label only: not paired."""
    mask, n_paired = checks.identical_pairs(
        prompt_key=[1, 1, 1, 2, 2], label=[True, False, False, True, True],
        ids_key=[7, 7, 7, 8, 8], text_key=[10, 11, 10, 12, 13])
    assert mask.tolist() == [True, True, False, False, False]
    assert n_paired == 3


def test_identical_pairs_matches_its_definition_row_by_row():
    """Random small cases (few distinct keys, so groups collide often) against the definition
    checked pair by pair."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        p, c, t = (rng.integers(0, k, n) for k in (4, 3, 3))
        y = rng.random(n) < 0.5
        want = [any(p[j] == p[i] and y[j] != y[i] and c[j] == c[i] and t[j] != t[i]
                    for j in range(n)) for i in range(n)]
        paired = sum(any(p[j] == p[i] and y[j] != y[i] for j in range(n)) for i in range(n))
        mask, n_paired = checks.identical_pairs(p, y, c, t)
        assert mask.tolist() == want and n_paired == paired


def test_decode_sample_is_fixed_and_spread():
    assert checks.sample_indices(1000, 4) == [0, 333, 666, 999]
    assert checks.sample_indices(3, 4) == [0, 1, 2]


# a tokenizer that drops text, as transformers builds one


WORD_ROWS = [
    {"prompt": "what is red?", "completion": "the red hat", "label": True},
    {"prompt": "what is red?", "completion": "the blue hat", "label": False},
    {"prompt": "say hi.", "completion": "hello", "label": True},
    {"prompt": "say hi.", "completion": "bad", "label": False},
]


def test_tokenizer_that_drops_the_words_stops_the_run(write, tmp_path):
    """Qwen2Tokenizer keeps '?' and '.' only. Every completion is EOS alone (4 of 4), both pairs
    are token-identical (4 of 4 paired rows), and the decode keeps 4 of 59 characters:
    prompts 10 + 10 + 6 + 6 (one kept each), completions 9 + 10 + 5 + 3 (none kept): 55 lost, 93.2%."""
    folder = word_level_qwen2_folder(tmp_path / "qwen")
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    path = write(WORD_ROWS)
    with pytest.raises(DataError) as err:
        tokenize_rows(load_rows(path), tok, max_length=32)
    assert str(err.value) == (
        f'{path}: row 1: tokenizer Qwen2Tokenizer({folder}) drops text: completion "the red hat" '
        f'tokenized to ["<|endoftext|>"]; 4 of 4 completions tokenize to EOS alone; 4 of 4 paired '
        f"rows have the same completion ids as a completion of the other label for their prompt, "
        f"though the texts differ; 93.2% of characters lost in a decode of 4 rows; check that the "
        f"tokenizer files load as the tokenizer the model was trained with (model.tokenizer_path set to "
        f"a folder holding the tokenizer files alone, without config.json, loads them as written)")


@pytest.mark.parametrize("how", ["class", "folder"])
def test_the_same_files_loaded_as_written_keep_the_text(write, tmp_path, how):
    """The tokenizer files load as written by their own class, or by AutoTokenizer from a folder
    without the model's config.json (what the error suggests)."""
    if how == "class":
        tok = PreTrainedTokenizerFast.from_pretrained(word_level_qwen2_folder(tmp_path / "qwen"))
    else:
        tok = AutoTokenizer.from_pretrained(word_level_qwen2_folder(tmp_path / "tok", config=False))
    _, report = tokenize_rows(load_rows(write(WORD_ROWS)), tok, max_length=32)
    assert (report.n_eos_only, report.n_identical, report.n_paired) == (0, 0, 4)
    assert (report.chars_decoded, report.chars_lost) == (59, 0)
    assert report.warnings() == []


def _drops_z():
    """The conftest word-level tokenizer, with a normalizer that deletes every 'z'."""
    tok = build_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Replace("z", "")
    return tok


def test_a_few_eos_only_completions_warn_with_an_example(write):
    """10 rows, prompt 'what is red' (9 characters), completion 'a red hat' (7), except row 4: 'zz'.
    EOS alone: 1 of 10 (10% > 1%). Decode: 2 of 90 + 9 * 7 + 2 = 155 characters lost (1.3% > 1%).
    No pair is token-identical with another text."""
    rows = [{"prompt": "what is red", "completion": "zz" if i == 3 else "a red hat",
             "label": i % 2 == 0} for i in range(10)]
    path = write(rows)
    _, report = tokenize_rows(load_rows(path), _drops_z(), max_length=32)
    name = f"{type(build_tokenizer()).__name__}(<in memory>)"
    example = f'{path} row 4: completion "zz" -> ["</s>"]'
    assert report.warnings() == [
        f"tokenizer {name} loses text: 1 of 10 completions tokenize to EOS alone (e.g. {example})",
        f"tokenizer {name} loses text: 1.3% of characters lost in a decode of 10 rows "
        f"(e.g. {example})"]
    assert report.summary().endswith(
        "tokenizer check: 1 completions only EOS, 0 of 10 paired rows token-identical to the other "
        "label, 1.3% of characters lost in a decode of 10 rows")


def test_token_identical_pair_warns(write):
    """Rows 1 (T) 'a red hat' and 2 (F) 'a red hat zz' get the same ids: 2 of 10 paired rows. The
    decode loses 2 of 10 * 26 + 7 + 9 + 4 * 3 + 4 * 2 = 296 characters (0.7%, under 1%)."""
    prompt = "what is the big red hat on the mat"
    rows = [{"prompt": prompt, "completion": "a red hat", "label": True},
            {"prompt": prompt, "completion": "a red hat zz", "label": False}]
    rows += [{"prompt": prompt, "completion": "yes" if i % 2 else "no", "label": i % 2 == 0}
             for i in range(8)]
    path = write(rows)
    _, report = tokenize_rows(load_rows(path), _drops_z(), max_length=32)
    assert (report.n_identical, report.n_paired, report.chars_decoded, report.chars_lost) == (
        2, 10, 296, 2)
    assert report.warnings() == [
        f"tokenizer {report.tokenizer} loses text: 2 of 10 paired rows have the same completion ids "
        f"as a completion of the other label for their prompt, though the texts differ (e.g. {path} "
        f'row 1: completion "a red hat" -> ["a", "red", "hat", "</s>"])']


# max_length cutting completions


def test_completions_cut_by_max_length_warn_with_the_share(write, tokenizer):
    """Prompt 'the' = 2 ids (BOS), completion of 6 words = 7 ids (EOS). max_length 4, max prompt 2:
    the completion keeps 2, loses 5; two rows lose 10 of 14 (71.4% > 10%). At max_length 9 both
    fit and nothing is said."""
    rows = [{"prompt": "the", "completion": "one two three four five six", "label": y}
            for y in (True, False)]
    path = write(rows)
    _, report = tokenize_rows(load_rows(path), tokenizer, max_length=4, max_prompt_length=2)
    assert (report.completion_tokens, report.completion_tokens_cut) == (14, 10)
    assert report.warnings() == [
        "data.max_length=4 cuts 71.4% of completion tokens (10 of 14; 2 rows truncated, 0 dropped): "
        "raise data.max_length or lower data.max_prompt_length=2"]
    assert "; 10 of 14 completion tokens (71.4%) cut by max_length;" in report.summary()
    _, report = tokenize_rows(load_rows(path), tokenizer, max_length=9, max_prompt_length=2)
    assert (report.completion_tokens_cut, report.warnings()) == (0, [])


# the demo's own tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megakto._demo.data import write_demo_data
    from megakto._demo.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("demo")
    model = make_tiny_model(root / "model", seed=0)
    train, _ = write_demo_data(root / "data", n_train_prompts=300, n_eval_prompts=10, seed=0)
    return str(model), str(train)


@pytest.mark.parametrize("chat", [False, True])
def test_demo_sentencepiece_tokenizer_keeps_every_character(demo, tmp_path, chat):
    """Byte fallback: nothing is lost, no completion is EOS alone, no pair collides, no warning."""
    model, train = demo
    tok = AutoTokenizer.from_pretrained(model)
    path = train
    if chat:  # the same rows as messages, rendered with the tiny model's chat template
        with open(train) as f:
            rows = [json.loads(line) for line in f]
        path = str(tmp_path / "chat.jsonl")
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                    "completion": [{"role": "assistant", "content": r["completion"]}],
                                    "label": r["label"]}) + "\n")
    ds = load_rows(path)
    _, report = tokenize_rows(ds, tok, max_length=64)
    assert report.warnings() == []
    assert (report.n_eos_only, report.n_identical, report.chars_lost) == (0, 0, 0)
    assert report.n_paired == len(ds) and report.n_decoded == checks.DECODE_SAMPLE
    assert report.chars_decoded > 10 * checks.DECODE_SAMPLE
    assert report.completion_tokens_cut == 0


def test_past_check_rows_the_checks_read_whole_prompts_of_a_fixed_sample(write, monkeypatch):
    """CHECK_ROWS = 10 over 40 rows (20 prompts x 2 labels): stride 4, the rows whose prompt key is
    0 modulo 4, both labels of each; each desirable completion is 'zz' (EOS alone under the
    z-dropping tokenizer), so the EOS-only count is half the checked rows; the same rows on a second run."""
    from megakto.data.tokenize import prompt_key

    monkeypatch.setattr(checks, "CHECK_ROWS", 10)
    rows = [{"prompt": f"what is {i // 2}", "completion": "zz" if i % 2 == 0 else "a red hat", "label": i % 2 == 0}
            for i in range(40)]
    want = sum(prompt_key(r["prompt"]) % 4 == 0 for r in rows)
    assert checks.check_stride(40) == 4 and 0 < want < 40 and want % 2 == 0
    _, report = tokenize_rows(load_rows(write(rows)), _drops_z(), max_length=32)
    assert (report.n_checked, report.n_eos_only, report.n_paired) == (want, want // 2, want)
    assert report.summary().count(f"tokenizer check on the {want} rows of a sample of prompts: {want // 2} "
                                  "completions only EOS") == 1
    assert report.check_seconds > 0
    _, again = tokenize_rows(load_rows(write(rows)), _drops_z(), max_length=32)
    assert again.n_checked == want
