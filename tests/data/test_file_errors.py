"""A text data file that breaks: one line naming the file and the line to open, never a
UnicodeDecodeError or datasets' "An error occurred while generating the dataset"."""

import json

import pytest

from megakto.data.rows import load_rows
from megakto.errors import DataError

GOOD = [json.dumps({"prompt": f"p{i}", "completion": "c", "label": i % 2 == 0}) for i in range(4)]


def _load_error(path) -> str:
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_jsonl_byte_not_utf8_names_the_line(tmp_path):
    """Line 3 holds 'café' written in Latin-1: 'caf' + byte 0xe9, the 16th byte of the line."""
    path = tmp_path / "latin1.jsonl"
    lines = [GOOD[0], GOOD[1], '{"prompt": "café", "completion": "c", "label": true}', GOOD[2]]
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    assert _load_error(path) == (f"{path}: cannot be loaded (line 3: not valid UTF-8 (byte 0xe9 at "
                                 f"column 16); re-save the file as UTF-8)")


def test_jsonl_byte_not_utf8_is_found_again_from_the_cache(tmp_path):
    """The second load reads datasets' cache of the same file and must fail the same way."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "p", "completion": "ol\xe9", "label": true}\n')
    assert _load_error(path) == _load_error(path)
    # '{"prompt": "p", ' is 16 bytes, '"completion": "' 15 more, then 'o', 'l': 0xe9 is byte 34
    assert "line 1: not valid UTF-8 (byte 0xe9 at column 34)" in _load_error(path)


@pytest.mark.parametrize("ext, line, column", [("csv", 3, 4), ("json", 2, 17)])
def test_csv_and_json_byte_not_utf8_names_the_line(tmp_path, ext, line, column):
    """csv line 3 is 'caf' + 0xe9 (column 4); json line 2 is ' {"prompt": "caf' + 0xe9 (column 17)."""
    path = tmp_path / f"latin1.{ext}"
    if ext == "csv":
        text = "prompt,completion,label\np,c,1\ncafé,c,0\n"
    else:
        text = ('[{"prompt": "p", "completion": "c", "label": true},\n'
                ' {"prompt": "café", "completion": "c", "label": false}]')
    path.write_bytes(text.encode("latin-1"))
    assert _load_error(path) == (f"{path}: cannot be loaded (line {line}: not valid UTF-8 (byte 0xe9 "
                                 f"at column {column}); re-save the file as UTF-8)")


def test_jsonl_line_not_json_names_the_line(tmp_path):
    """A blank line (which datasets skips) still counts: the bad object is on line 4."""
    path = tmp_path / "bad.jsonl"
    lines = [GOOD[0], "", GOOD[1], '{"prompt": "x", "completion": "c", "label": tru}', GOOD[2]]
    path.write_text("\n".join(lines) + "\n")
    assert _load_error(path) == (f"{path}: cannot be loaded (line 4: not valid JSON (Expecting value "
                                 f"at column 45))")


def test_jsonl_line_not_an_object_names_the_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(f"{GOOD[0]}\n{GOOD[1]}\n[1, 2]\n")
    assert _load_error(path) == f"{path}: cannot be loaded (line 3: expected a JSON object, got list)"


def test_json_file_syntax_error_names_the_line(tmp_path):
    """Line 2 is ' {"prompt": "y" "completion"...': the comma is missing before column 17."""
    path = tmp_path / "bad.json"
    path.write_text('[{"prompt": "x", "completion": "c", "label": true},\n'
                    ' {"prompt": "y" "completion": "c", "label": false}]')
    assert _load_error(path) == (f"{path}: cannot be loaded (line 2: not valid JSON (Expecting ',' "
                                 f"delimiter at column 17))")


def test_json_file_of_json_lines_names_the_bad_line(tmp_path):
    """datasets reads a .json file of JSON lines; a bad line in one is found the same way."""
    path = tmp_path / "lines.json"
    path.write_text(f"{GOOD[0]}\n{GOOD[1]}\n{{oops\n")
    assert _load_error(path) == (f"{path}: cannot be loaded (line 3: not valid JSON (Expecting "
                                 f"property name enclosed in double quotes at column 2))")


def test_csv_with_extra_fields_names_the_line(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_text("prompt,completion,label\np,c,1\np,c,0,5,6\n")
    assert _load_error(path) == f"{path}: cannot be loaded (Expected 3 fields in line 3, saw 5)"


def test_valid_files_load_unchanged(tmp_path):
    """The scans run only when loading fails: a UTF-8 file with a non-ASCII text loads as is."""
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join([GOOD[0], json.dumps({"prompt": "café ☕", "completion": "oui",
                                                    "label": False})]) + "\n", encoding="utf-8")
    ds = load_rows(str(path))
    assert ds["prompt"][:] == ["p0", "café ☕"]
