import os
import subprocess
import sys

import pytest

from megakto.data.rows import load_rows
from megakto.data.tokenize import TokenizeReport, fit_to_length, prompt_key, tokenize_rows
from megakto.errors import DataError, ModelError
from tests.data.conftest import (CHAT_TEMPLATE_BROKEN, CHAT_TEMPLATE_NO_BOS,
                                 CHAT_TEMPLATE_WITH_BOS, build_tokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOS, EOS = 2, 3  # ids of <s> and </s> in the conftest vocabulary


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# fit_to_length: hand-worked


def test_fit_unchanged_when_it_fits():
    """3 + 5 = 8 <= 8: nothing to cut, even though the prompt is over max_prompt_length=2."""
    assert fit_to_length([1, 2, 3], [4, 5, 6, 7, 8], 8, 2) == ([1, 2, 3], [4, 5, 6, 7, 8])


def test_fit_cuts_the_prompt_from_the_left():
    """p=10, c=3, max 8, mpl 4: the prompt keeps min(10, max(8-3, 4)) = 5 tokens from its end;
    the completion keeps all 8-5 = 3."""
    assert fit_to_length(list(range(1, 11)), [11, 12, 13], 8, 4) == (
        [6, 7, 8, 9, 10], [11, 12, 13])


def test_fit_cuts_the_completion_from_the_right():
    """p=3, c=10, max 8, mpl 4: the prompt keeps min(3, max(8-10, 4)) = 3 (all of it);
    the completion keeps its first 8-3 = 5."""
    assert fit_to_length([1, 2, 3], list(range(4, 14)), 8, 4) == ([1, 2, 3], [4, 5, 6, 7, 8])


def test_fit_cuts_both():
    """p=10, c=10, max 8, mpl 3: prompt keeps min(10, max(-2, 3)) = 3 from the end [8, 9, 10];
    completion keeps 8-3 = 5 from the start."""
    assert fit_to_length(list(range(1, 11)), list(range(11, 21)), 8, 3) == (
        [8, 9, 10], [11, 12, 13, 14, 15])


def test_fit_none_when_no_completion_token_fits():
    """p=6, c=2, max 4, mpl 4: the prompt keeps min(6, max(2, 4)) = 4, leaving 4-4 = 0."""
    assert fit_to_length([1, 2, 3, 4, 5, 6], [7, 8], 4, 4) is None
    # the same row with mpl 3 keeps one completion token
    assert fit_to_length([1, 2, 3, 4, 5, 6], [7, 8], 4, 3) == ([4, 5, 6], [7])


# tokenize_rows


def test_plain_rows_get_bos_and_eos(write, tokenizer):
    rows = [{"prompt": "the cat", "completion": "sat on the mat", "label": True},
            {"prompt": "", "completion": "hello", "label": False}]
    path = write(rows)
    out, report = tokenize_rows(load_rows(path), tokenizer, max_length=32)
    t = dict(zip(["the", "cat", "sat", "on", "mat", "hello"],
                 tokenizer.convert_tokens_to_ids(["the", "cat", "sat", "on", "mat", "hello"])))
    assert out.column_names == ["prompt_ids", "completion_ids", "label", "prompt_key", "source", "row"]
    assert out["prompt_ids"][:] == [[BOS, t["the"], t["cat"]], [BOS]]
    assert out["completion_ids"][:] == [[t["sat"], t["on"], t["the"], t["mat"], EOS],
                                        [t["hello"], EOS]]
    assert out["label"][:] == [True, False]
    assert out["source"][:] == [path, path]
    assert out["row"][:] == [1, 2]
    # 5 + 2 completion tokens, none cut; no prompt has both labels; the decode of both rows keeps
    # all 6 + 11 + 0 + 5 = 22 non-space characters of "the cat", "sat on the mat", "", "hello"
    assert report == TokenizeReport(2, 0, 0, [], 32, 16, completion_tokens=7, n_decoded=2,
                                    chars_decoded=22,
                                    tokenizer=f"{type(tokenizer).__name__}(<in memory>)")


CHAT = [{"prompt": [{"role": "system", "content": "say yes"}, {"role": "user", "content": "hi"}],
         "completion": [{"role": "assistant", "content": "yes"}], "label": True},
        {"prompt": [{"role": "user", "content": "what is red"}],
         "completion": [{"role": "assistant", "content": "a red hat"}], "label": False}]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE_WITH_BOS, CHAT_TEMPLATE_NO_BOS])
def test_chat_rows_split_the_rendered_conversation(write, template):
    """prompt + completion (minus our EOS) is exactly the tokenized full conversation, with one
    BOS whether the template writes it or the tokenizer adds it."""
    tok = build_tokenizer(template)
    out, _ = tokenize_rows(load_rows(write(CHAT)), tok, max_length=64)
    for r, p_ids, c_ids in zip(CHAT, out["prompt_ids"][:], out["completion_ids"][:]):
        full = tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
        prompt = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        full_ids = _ids(tok, full)
        if template == CHAT_TEMPLATE_NO_BOS:
            full_ids = [BOS] + full_ids
        assert p_ids.count(BOS) == 1 and p_ids[0] == BOS
        assert p_ids == full_ids[:len(p_ids)]
        assert p_ids[1:] == _ids(tok, prompt.removeprefix("<s>"))
        assert c_ids == full_ids[len(p_ids):] + [EOS]
    # hand-checked tokens of the second row's completion
    assert tok.convert_ids_to_tokens(out["completion_ids"][1]) == ["a", "red", "hat", "<|end|>", "</s>"]


def test_template_that_closes_turns_with_eos_gets_one_eos(write):
    tok = build_tokenizer(CHAT_TEMPLATE_WITH_BOS.replace("<|end|>", "{{ eos_token }}"))
    out, _ = tokenize_rows(load_rows(write(CHAT)), tok, max_length=64)
    assert tok.convert_ids_to_tokens(out["completion_ids"][1]) == ["a", "red", "hat", "</s>"]


def test_template_that_cannot_be_split_names_the_row(write):
    tok = build_tokenizer(CHAT_TEMPLATE_BROKEN)
    path = write(CHAT)
    with pytest.raises(DataError, match=r"^" + path + r": row 1: field 'completion': the chat "
                                        r"template's rendering of prompt \+ completion does not start"):
        tokenize_rows(load_rows(path), tok, max_length=64)


def test_mixed_text_and_chat_rows(write, tokenizer):
    a = write(CHAT[:1], name="a")
    b = write([{"prompt": "the cat", "completion": "sat", "label": False}], name="b")
    out, _ = tokenize_rows(load_rows([a, b]), tokenizer, max_length=64)
    assert tokenizer.convert_ids_to_tokens(out["prompt_ids"][1]) == ["<s>", "the", "cat"]
    assert tokenizer.convert_ids_to_tokens(out["completion_ids"][0]) == ["yes", "<|end|>", "</s>"]



def _six_rows():
    w = "one two three four five six".split()
    return [
        {"prompt": "the", "completion": "a cat", "label": True},
        {"prompt": "the cat", "completion": " ".join(w[:4]), "label": False},
        {"prompt": " ".join(w), "completion": "hi", "label": True},
        {"prompt": "a", "completion": "red hat", "label": False},
        {"prompt": "a", "completion": " ".join(w[:5]), "label": True},
        {"prompt": " ".join(w), "completion": "no", "label": False},
    ]

def test_report_counts_the_rows_built_to_be_truncated_and_dropped(write, tokenizer):
    """max_length 6, max_prompt_length 6. Lengths: prompt = words + 1 (BOS), completion =
    words + 1 (EOS).
      rows 1, 4: p=2, c=3 -> 5 <= 6 fits
      row 2: p=3, c=5 -> 8 > 6; prompt keeps min(3, max(1, 6)) = 3, completion 6-3 = 3: truncated
      row 5: p=2, c=6 -> 8 > 6; prompt keeps min(2, 6) = 2, completion 4: truncated
      rows 3, 6: p=7, c=2 -> prompt keeps min(7, max(4, 6)) = 6, completion 0: dropped
    Completion tokens: 3 + 5 + 2 + 3 + 6 + 2 = 21; cut: 2 (row 2) + 2 (row 5) + 2 + 2 (dropped
    rows 3, 6) = 8. Paired rows (prompt with both labels): rows 3, 6 and rows 4, 5.
    """
    path = write(_six_rows())
    out, report = tokenize_rows(load_rows(path), tokenizer, max_length=6, max_prompt_length=6)
    assert (report.n_rows, report.n_truncated, report.n_dropped) == (6, 2, 2)
    assert report.dropped_rows == [(path, 3), (path, 6)]
    assert out["row"][:] == [1, 2, 4, 5]
    assert [len(p) + len(c) for p, c in zip(out["prompt_ids"][:], out["completion_ids"][:])] == [
        5, 6, 5, 6]
    # the truncated completion of row 2 lost its EOS: it no longer ends there
    assert tokenizer.convert_ids_to_tokens(out["completion_ids"][1]) == ["one", "two", "three"]
    assert report.summary() == (
        "tokenized 6 rows (max_length=6, max_prompt_length=6): 2 truncated, 2 dropped "
        f"(no room for a completion token; first: {path} row 3); 8 of 21 completion tokens "
        "(38.1%) cut by max_length; tokenizer check: 0 completions only EOS, 0 of 4 paired rows "
        "token-identical to the other label, 0.0% of characters lost in a decode of 6 rows")


def test_overlong_drop_leaves_out_every_row_whose_completion_would_be_cut(write, tokenizer):
    """The six rows above at max_length=6, max_prompt_length=6, data.overlong=drop: rows 2 and 5
    would lose 2 completion tokens each (5 -> 3, 6 -> 4), so they are left out and each is named;
    rows 3 and 6 have no room at all, as before; rows 1 and 4 fit whole. Under truncate the same
    rows give one line: 2 of 4 kept completions cut, by 4 tokens in all, 2 at most."""
    path = write(_six_rows())
    out, report = tokenize_rows(load_rows(path), tokenizer, max_length=6, max_prompt_length=6, overlong="drop")
    assert out["row"][:] == [1, 4]
    assert (report.n_truncated, report.n_dropped, report.n_overlong) == (0, 2, 2)
    assert report.overlong_rows == [(path, 2, 5, 2), (path, 5, 6, 2)]
    assert report.overlong_lines() == [
        f"{path} row 2: dropped by data.overlong=drop: its completion of 5 tokens would lose 2 to data.max_length=6",
        f"{path} row 5: dropped by data.overlong=drop: its completion of 6 tokens would lose 2 to data.max_length=6"]
    assert ", 2 dropped by data.overlong=drop (a completion would be cut);" in report.summary()
    assert report.cut_line() is None
    _, report = tokenize_rows(load_rows(path), tokenizer, max_length=6, max_prompt_length=6)
    assert report.overlong_lines() == [] and "data.overlong" not in report.summary()
    assert report.cut_line() == ("data.max_length=6 cut 2 of 4 completions: by 4 tokens in all, 2.0 on average, "
                                 "2 at most (data.overlong=drop leaves such rows out instead)")


def test_overlong_drop_keeps_a_row_whose_prompt_alone_is_cut(write, tokenizer):
    """Prompt of 6 words = 7 ids, completion 'hi' = 2 ids, max_length 6, max prompt 3: the prompt
    keeps its last 4 ids and the completion stays whole, so drop keeps the row."""
    path = write([{"prompt": "one two three four five six", "completion": "hi", "label": True}])
    out, report = tokenize_rows(load_rows(path), tokenizer, max_length=6, max_prompt_length=3, overlong="drop")
    assert (len(out["prompt_ids"][0]), len(out["completion_ids"][0])) == (4, 2)
    assert (report.n_truncated, report.n_overlong) == (1, 0)


def test_overlong_drop_of_every_row_is_one_line(write, tokenizer):
    path = write([{"prompt": "the", "completion": "one two three four five", "label": True}])
    with pytest.raises(DataError) as err:
        tokenize_rows(load_rows(path), tokenizer, max_length=4, max_prompt_length=2, overlong="drop")
    assert str(err.value) == (
        f"{path}: all 1 rows dropped: data.overlong=drop and no completion fits whole within max_length=4 "
        "(max_prompt_length=2); raise data.max_length or set data.overlong=truncate")


def test_all_rows_dropped_names_source_and_max_length(write, tokenizer):
    path = write([{"prompt": "one two three four", "completion": "yes", "label": True}])
    with pytest.raises(DataError) as err:
        tokenize_rows(load_rows(path), tokenizer, max_length=4, max_prompt_length=4)
    assert str(err.value) == (
        f"{path}: all 1 rows dropped: prompt plus completion leaves no room for a completion "
        "token within max_length=4 (max_prompt_length=4)")


def test_tokenizer_without_eos_is_named(write):
    tok = build_tokenizer(eos=False)
    tok.name_or_path = "models/tiny"
    with pytest.raises(ModelError) as err:
        tokenize_rows(load_rows(write(CHAT)), tok, max_length=16)
    assert str(err.value) == (f"tokenizer {type(tok).__name__}(models/tiny) has no eos_token; "
                              "a KTO completion must end with one")


PROMPTS = ["the cat", "a dog", "the cat", "the  cat"]


def test_prompt_key_groups_equal_prompt_text(write, tokenizer):
    rows = [{"prompt": p, "completion": c, "label": i % 2 == 0}
            for i, (p, c) in enumerate(zip(PROMPTS, ["sat", "ran", "ran", "sat"]))]
    out, _ = tokenize_rows(load_rows(write(rows)), tokenizer, max_length=16)
    keys = out["prompt_key"][:]
    assert keys == [prompt_key(p) for p in PROMPTS]
    assert keys[0] == keys[2]
    assert len({keys[0], keys[1], keys[3]}) == 3  # "the  cat" is different text
    assert all(0 <= k < 2**63 for k in keys)
    # chat prompts are keyed by their rendered text
    out, _ = tokenize_rows(load_rows(write(CHAT, name="chat")), tokenizer, max_length=64)
    assert out["prompt_key"][1] == prompt_key("<s><|user|> what is red <|end|> <|assistant|> ")


@pytest.mark.gloo
def test_prompt_key_is_the_same_in_another_process():
    """Python's str hash is salted per process; the key must not be."""
    code = ("from megakto.data.tokenize import prompt_key; "
            f"print([prompt_key(p) for p in {PROMPTS!r}])")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONHASHSEED": seed,
                                              "PYTHONPATH": REPO})
             for seed in ("1", "2")]
    for proc in procs:
        stdout, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert stdout.strip() == str([prompt_key(p) for p in PROMPTS])


def test_map_is_cached_and_num_proc_gives_the_same_rows(write, tokenizer):
    ds = load_rows(write(CHAT * 4))
    first, _ = tokenize_rows(ds, tokenizer, max_length=12)
    again, _ = tokenize_rows(ds, tokenizer, max_length=12)
    assert first.cache_files == again.cache_files and first.cache_files
    multi, report = tokenize_rows(ds, tokenizer, max_length=12, num_proc=2)
    assert multi[:] == first[:]
    assert report.n_rows == 8
