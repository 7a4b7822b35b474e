"""A data file that cannot be read, under the real launcher (2 ranks): one line naming the file and
the line, printed once, every rank exits non-zero. Both fail at start-up, before any model is built."""

import json

import pytest

from tests.e2e.test_errors import _assert_one_error, _run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _rows(n=20):
    return [json.dumps({"prompt": f"p{i}", "completion": "c", "label": i % 2 == 0}) for i in range(n)]


def test_byte_not_utf8(assets, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    lines = _rows()
    lines[6] = '{"prompt": "café", "completion": "c", "label": true}'
    bad.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    proc, lines, output = _run(assets, tmp_path, f"data.train_files={bad}")
    _assert_one_error(proc, lines, output, str(bad), "line 7: not valid UTF-8 (byte 0xe9 at column 16)")
    assert "rank 1" not in lines[0]


def test_line_not_json(assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = _rows()
    lines[11] = lines[11][:-1]  # the closing brace is missing
    bad.write_text("\n".join(lines) + "\n")
    proc, lines, output = _run(assets, tmp_path, f"data.train_files={bad}")
    _assert_one_error(proc, lines, output, str(bad), "line 12: not valid JSON")
    assert "rank 1" not in lines[0]


def _conversations(n=20):
    return [json.dumps({"messages": [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": "a"},
                                     {"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
                        "label": i % 2 == 0}) for i in range(n)]


def test_a_message_without_role(assets, tmp_path):
    bad = tmp_path / "chats.jsonl"
    lines = _conversations()
    lines[4] = json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}], "label": True})
    bad.write_text("\n".join(lines) + "\n")
    proc, lines, output = _run(assets, tmp_path, f"data.train_files={bad}")
    _assert_one_error(proc, lines, output, f"{bad}: row 5: field 'messages': message 1: has no 'role'")


def test_a_template_that_cannot_be_split(assets, tmp_path):
    """The tiny model with a template that renders past assistant turns as 'hat' (as templates that
    strip reasoning do): every conversation fails the prefix check; the first row is named."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    (model / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' and not loop.last %}"
        "hat{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(_conversations()) + "\n")
    proc, lines, output = _run(assets, tmp_path, f"data.train_files={data}", f"model.path={model}")
    _assert_one_error(proc, lines, output, f"{data}: row 1: field 'messages': message 2: the chat template's "
                                           "rendering of the conversation up to this assistant turn is not a prefix")
