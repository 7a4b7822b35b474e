"""Conversation rows (megakto/data/conversations.py): the assistant-token mask under two real chat
templates (a Llama-3-style and a Qwen-style one, tests/data/chat_templates/), generation markers,
per-turn labels, the log-prob of a row against its per-turn pieces, KL rows, and bad input."""

import json
from pathlib import Path

import pytest
import torch

from megakto.data._messages import conversation_json
from megakto.data.conversations import examples, render_pieces
from megakto.data.packing import pack, pad_rows
from megakto.data.rows import load_rows
from megakto.data.tokenize import tokenize_rows
from megakto.errors import DataError
from megakto.kto.segment_logps import segment_logps
from tests.data.conftest import build_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# Three assistant turns: a tool call, an answer from its result, and a reply to a thank-you.
MESSAGES = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
# What each template writes for the three assistant turns (scored) and the two context pieces
# between them (read, not scored), by hand from the templates' text.
EXPECTED = {
    "llama3_style": (
        ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
         "It is sunny.<|eot_id|>", "You are welcome.<|eot_id|>"],
        ['<|start_header_id|>ipython<|end_header_id|>\n\n"sunny"<|eot_id|>'
         "<|start_header_id|>assistant<|end_header_id|>\n\n",
         "<|start_header_id|>user<|end_header_id|>\n\nThanks!<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n"]),
    "qwen_style": (
        ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
         "It is sunny.<|im_end|>\n", "You are welcome.<|im_end|>\n"],
        ["<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
         "<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n"]),
}
PROMPT_ENDS = {"llama3_style": "What is the weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               "qwen_style": "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"}


def _tokenizer(name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TEMPLATES / name))


def _runs(ids, mask, value):
    """Maximal runs of ``ids`` where ``mask == value``."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m == value:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name", ["llama3_style", "qwen_style"])
def test_assistant_mask_of_a_three_turn_conversation_with_a_tool_call(name):
    """The packed row's completion mask covers exactly the three assistant pieces: the tool call
    as the template writes it (Llama: a JSON with "parameters"; Qwen: a <tool_call> block), then
    the two answers, each with its end-of-turn token; the tool result and the user turn between
    them, with the next assistant header, are context, and so is everything before the first
    assistant turn (the prompt: system header, tool schemas, the question, the header)."""
    tok = _tokenizer(name)
    conv = conversation_json(MESSAGES, TOOLS)
    (ex,) = examples(tok, conv, True, "chat.jsonl", 1)  # no turn labels: the row's label
    assert ex.prompt_text.endswith(PROMPT_ENDS[name]) and ex.label is True
    assert '"name": "get_weather"' in ex.prompt_text  # the tools column reached the template
    batch = pack([(ex.prompt_ids, ex.completion_ids)], 1000, pad_id=0)
    ids, mask = batch.input_ids[0].tolist(), batch.completion_mask[0].tolist()
    assistant, context = EXPECTED[name]
    assert [tok.decode(r) for r in _runs(ids, mask, 1)] == assistant
    scored_and_between = ids[len(ex.prompt_ids):]
    assert [tok.decode(r) for r in _runs(scored_and_between, mask[len(ex.prompt_ids):], 0)] == context
    # Each assistant run is that turn's text tokenized on its own.
    assert _runs(ids, mask, 1) == [tok(t, add_special_tokens=False)["input_ids"] for t in assistant]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_generation_markers_are_used_where_the_template_has_them():
    """A template marking assistant content with {% generation %}: the marked characters are the
    assistant pieces ('yes <|end|> ' is inside the markers here, the header is not)."""
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> "
                "{% generation %}{{ m['content'] }} <|end|> {% endgeneration %}{% else %}<|{{ m['role'] }}|> "
                "{{ m['content'] }} <|end|> {% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    tok = build_tokenizer(template)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "why"}, {"role": "assistant", "content": "no"}]
    pieces = render_pieces(tok, msgs, None, "s", 1)
    assert [(p.text, p.turn) for p in pieces] == [
        ("<s><|user|> hi <|end|> <|assistant|> ", None), ("yes <|end|> ", 1),
        ("<|user|> why <|end|> <|assistant|> ", None), ("no <|end|> ", 3)]


def test_turn_labels_give_one_example_per_labelled_turn_with_the_conversation_before_it():
    """Turns 2 and 4 labelled (true, false), turn 6 not: two examples. The first's prompt is the
    context before turn 2; the second's is everything before turn 4, the first assistant turn
    included as plain prompt ids; each completion is its own turn, all scored. The second
    prompt's ids start with the first example's prompt + completion ids: the shared prefix is
    tokenized once."""
    tok = _tokenizer("qwen_style")
    msgs = [dict(m) for m in MESSAGES]
    msgs[1]["label"], msgs[3]["label"] = True, False
    first, second = examples(tok, conversation_json(msgs, TOOLS), False, "s", 1)  # the row label is unused
    assistant, context = EXPECTED["qwen_style"]
    assert (first.label, second.label) == (True, False)
    assert (tok.decode(first.completion_ids), tok.decode(second.completion_ids)) == tuple(assistant[:2])
    assert second.prompt_text == first.prompt_text + assistant[0] + context[0]
    assert second.prompt_ids[:len(first.prompt_ids) + len(first.completion_ids)] == first.prompt_ids + first.completion_ids
    assert min(first.completion_ids + second.completion_ids) >= 0  # no context ids: the turn alone


def _causal_logits(input_ids, vocab=600):
    """A causal toy model: the logits at t depend on tokens 0..t of the row (a running sum of
    fixed random embeddings), and restart at every segment as packing requires."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(vocab, vocab, generator=g)
    return torch.cumsum(emb[input_ids], dim=1)


def test_a_rows_log_prob_is_the_sum_over_its_per_turn_pieces():
    """Summed over the mask, the conversation's log-prob (one segment) equals the sum of its three
    per-turn examples' log-probs (each the conversation up to a turn, scored on that turn), since
    a causal model sees the same tokens before each assistant token either way."""
    tok = _tokenizer("llama3_style")
    (whole,) = examples(tok, conversation_json(MESSAGES, TOOLS), True, "s", 1)
    msgs = [dict(m, label=True) if m["role"] == "assistant" else m for m in MESSAGES]
    turns = examples(tok, conversation_json(msgs, TOOLS), False, "s", 1)
    assert len(turns) == 3

    def logps(rows):
        b = pad_rows(rows, pad_id=0)  # one sequence a row: the toy model's running sum stays in it
        return segment_logps(_causal_logits(b.input_ids), b.input_ids, b.completion_mask, b.segment_ids,
                             b.num_segments)[0]

    one = logps([(whole.prompt_ids, whole.completion_ids)])
    pieces = logps([(t.prompt_ids, t.completion_ids) for t in turns])
    torch.testing.assert_close(one.sum(), pieces.sum(), rtol=1e-5, atol=1e-3)
    assert sum(len(t.completion_ids) for t in turns) == sum(1 for x in whole.completion_ids if x >= 0)


def test_a_kl_row_pairs_one_rows_context_with_anothers_assistant_turns():
    """The KL row (x_i, y_j) for conversation j is row i's prompt followed by j's completion: j's
    three assistant turns scored, j's tool and user turns between them read as context."""
    tok = _tokenizer("qwen_style")
    (j,) = examples(tok, conversation_json(MESSAGES, TOOLS), True, "s", 1)
    other = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    (i,) = examples(tok, conversation_json(other, None), False, "s", 2)
    batch = pack([(i.prompt_ids, j.completion_ids)], 1000, pad_id=0)
    ids, mask = batch.input_ids[0].tolist(), batch.completion_mask[0].tolist()
    assert ids[:len(i.prompt_ids)] == i.prompt_ids and sum(mask[:len(i.prompt_ids)]) == 0
    assert [tok.decode(r) for r in _runs(ids, mask, 1)] == EXPECTED["qwen_style"][0]


def test_a_template_that_rewrites_earlier_turns_is_one_error_naming_the_row():
    """Past assistant turns rendered as '[past]' (as templates that strip reasoning do): the
    rendering up to turn 2 is not a prefix of the whole."""
    template = ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] == 'assistant' and not loop.last %}"
                "hat{% else %}{{ m['content'] }}{% endif %} <|end|> {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    tok = build_tokenizer(template)
    conv = conversation_json([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                              {"role": "user", "content": "why"}, {"role": "assistant", "content": "no"}], None)
    with pytest.raises(DataError) as err:
        examples(tok, conv, True, "chat.jsonl", 7)
    assert str(err.value).startswith("chat.jsonl: row 7: field 'messages': message 2: the chat template's rendering "
                                     "of the conversation up to this assistant turn is not a prefix")
    assert "\n" not in str(err.value)


def _conv_rows():
    return [
        {"messages": MESSAGES[:4], "label": True, "tools": TOOLS},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}],
         "label": False, "tools": None},
    ]


def test_conversation_files_load_and_tokenize(write):
    """Two conversation rows (one with tools): loaded as a JSON conversation column beside empty
    prompt and completion, tokenized to one example each with the context inside the first
    completion as context ids."""
    path = write(_conv_rows())
    rows = load_rows(path)
    assert rows.column_names == ["prompt", "completion", "label", "source", "row", "conversation"]
    first = json.loads(rows["conversation"][0])
    assert first["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert first["tools"] == TOOLS and "tools" not in json.loads(rows["conversation"][1])
    tok = _tokenizer("qwen_style")
    out, report = tokenize_rows(rows, tok, max_length=1024)
    assert out["label"][:] == [True, False] and out["row"][:] == [1, 2] and report.n_dropped == 0
    assert min(out["completion_ids"][0]) < 0 <= min(out["completion_ids"][1])


def test_turn_labelled_rows_expand_and_mix_with_plain_rows(write):
    msgs = [dict(m) for m in MESSAGES]
    msgs[1]["label"], msgs[5]["label"] = False, True
    conv = write([{"messages": msgs, "tools": TOOLS}], name="conv")
    plain = write([{"prompt": "hi", "completion": "yes", "label": True}], name="plain")
    rows = load_rows([conv, plain])
    assert rows["conversation"][1] is None and rows["prompt"][0] == ""
    out, report = tokenize_rows(rows, _tokenizer("llama3_style"), max_length=1024)
    assert out["label"][:] == [False, True, True]
    assert list(zip(out["source"][:], out["row"][:])) == [(conv, 1), (conv, 1), (plain, 1)]
    assert report.n_examples == 3 and report.n_rows == 2


@pytest.mark.parametrize("rows, msg", [
    ([{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yes"}], "label": True}],
     "row 1: field 'messages': message 1: has no 'role' (got {\"content\": \"hi\"})"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes", "label": "yes"}]}],
     "row 1: field 'messages': message 2: field 'label': expected a bool (true/false or 0/1), got \"yes\""),
    ([{"messages": [{"role": "user", "content": "hi", "label": True}, {"role": "assistant", "content": "yes"}],
       "label": True}],
     "row 1: field 'messages': message 1: a user turn carries a 'label'; only assistant turns do"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes", "label": True}],
       "label": False}],
     "row 1: field 'label': the row's assistant turns carry labels, so the row takes none (got false)"),
    ([{"messages": [{"role": "user", "content": "hi"}], "label": True}],
     "row 1: field 'messages': no assistant turn, so nothing to score"),
    ([{"messages": [{"role": "assistant", "content": "hi"}], "label": True}],
     "row 1: field 'messages': message 1: an assistant turn opens the conversation; it needs a system or user "
     "turn before it"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}], "label": "x"}],
     "row 1: field 'label': expected a bool (true/false or 0/1), got \"x\" (or label the assistant turns)"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "label": True}],
     "row 1: field 'messages': message 2: field 'content': expected a string, got 3"),
])
def test_bad_conversation_rows_are_one_line_naming_file_and_row(write, rows, msg):
    path = write(rows)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: {msg}"


def test_a_negative_weight_on_a_conversation_row_names_it(write):
    rows = _conv_rows()
    rows[1]["weight"], rows[0]["weight"] = -1.0, 1.0
    path = write(rows)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}: row 2: field 'weight': expected a finite number >= 0, got -1.0"


def test_the_report_counts_rows_per_format_and_assistant_tokens(write):
    """One text row, two conversation rows (the first with turn labels on two turns): 3 examples
    from conversations; their assistant tokens are each example's scored completion tokens."""
    msgs = [dict(m) for m in MESSAGES]
    msgs[1]["label"], msgs[3]["label"] = True, False
    conv = write([{"messages": msgs, "tools": TOOLS},
                  {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}],
                   "label": False}], name="conv")
    plain = write([{"prompt": "hi", "completion": "yes", "label": True}], name="plain")
    out, report = tokenize_rows(load_rows([conv, plain]), _tokenizer("qwen_style"), max_length=1024)
    scored = [sum(1 for t in c if t >= 0) for c in out["completion_ids"][:3]]
    assert report.formats == {"text": 1, "chat": 0, "conversation": 2}
    assert (report.n_conversation_examples, report.assistant_tokens) == (3, sum(scored))
    assert report.formats_line() == (f"rows per format: 1 text, 0 chat, 2 conversation (-> 3 examples kept, "
                                     f"{sum(scored) / 3:.1f} assistant tokens per example after fitting)")
