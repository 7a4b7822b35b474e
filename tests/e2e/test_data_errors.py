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
