"""Find the line that a text data file (JSON lines, JSON, CSV) fails on.

``datasets`` reads these files with pyarrow and pandas, whose errors name a block offset or
nothing at all ("An error occurred while generating the dataset"), and pyarrow's JSON reader takes
bytes that are not UTF-8 without complaint, so a bad byte only surfaces later as a
``UnicodeDecodeError`` with no file in it. These scans run only after such a failure, to turn it
into one line naming the file and the line: a file a user can open at that line and fix.
"""

from __future__ import annotations

import json

__all__ = ["TEXT_EXTENSIONS", "bad_utf8", "bad_json_lines", "bad_json", "locate"]

TEXT_EXTENSIONS = (".jsonl", ".json", ".csv")


def bad_utf8(path: str) -> str | None:
    """``"line N: not valid UTF-8 (byte 0xXX at column C)"`` for the first bad byte, else None."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"line {n}: not valid UTF-8 (byte 0x{line[err.start]:02x} at column "
                        f"{err.start + 1}); re-save the file as UTF-8")
    return None


def bad_json_lines(path: str) -> str | None:
    """The first line of a JSON lines file that is not one JSON object; blank lines are skipped,
    as ``datasets`` skips them."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {n}: not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(value, dict):
                return f"line {n}: expected a JSON object, got {type(value).__name__}"
    return None


def bad_json(path: str) -> str | None:
    """Where a ``.json`` file breaks: one JSON document, or JSON lines (``datasets`` takes both)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # more than one document: read it as JSON lines
            return bad_json_lines(path)
        return f"line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
    return None


def locate(path: str, ext: str, err: BaseException | None = None) -> str | None:
    """What is wrong with the text file at ``path``, naming the line; None if no line is to blame.
    ``err`` is the loader's exception: for CSV, pandas' parser names the line itself."""
    if ext not in TEXT_EXTENSIONS:
        return None
    found = bad_utf8(path)
    if found or ext == ".csv":
        return found or _pandas_parser_message(err)
    return bad_json_lines(path) if ext == ".jsonl" else bad_json(path)


def _pandas_parser_message(err: BaseException | None) -> str | None:
    """pandas' ``ParserError`` ("Expected 3 fields in line 3, saw 5"), found along the cause chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ == "ParserError":
            text = " ".join(str(err).split())
            return text.removeprefix("Error tokenizing data. C error: ")
        err = err.__cause__ or err.__context__
    return None
