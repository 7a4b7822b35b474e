"""Convert rated chat logs into KTO conversation rows ``{"messages": [...], "label": bool}``.

    python tools/conversations_to_kto.py chats.jsonl kto.jsonl [--label-field F] [--threshold T]
        [--turn-label-field F] [--weight-field F]

Input rows hold a conversation, either as ``messages`` (``{"role", "content"}``, with
``tool_calls`` where an assistant calls a tool) or in ShareGPT's form, ``conversations`` of
``{"from", "value"}`` (``human`` -> user, ``gpt`` -> assistant, ``function_call`` -> assistant,
``observation`` -> tool), and the feedback on it:

* ``--label-field F`` (default ``label``): the row's feedback, a bool, or a number that is
  desirable when >= ``--threshold`` (a thumbs-up, a resolved ticket, a passing check, a rating);
* ``--turn-label-field F``: feedback on assistant messages instead (a field of the message, bool
  or number as above): every rated turn becomes one KTO example (megakto/data/conversations.py);
* ``--weight-field F``: a row's confidence, written as the row's ``weight`` (finite, >= 0).

A ``tools`` column is kept. Rows without feedback are left out and counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/_jsonl.py, however the script is loaded

from megakto.data.rows import read_source  # noqa: E402
from megakto.errors import DataError, MegaktoError  # noqa: E402
from _jsonl import write_jsonl  # noqa: E402

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


def _label(value, threshold: float, where: str) -> bool | None:
    """A bool, 0/1, or a number compared with ``threshold``; None when there is no feedback."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value >= threshold
    raise DataError(f"{where}: expected a bool or a number, got {json.dumps(value)}")


def _messages(row: dict, where: str) -> list[dict]:
    if row.get("messages") is not None:
        return [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
    if row.get("conversations") is not None:
        out = []
        for j, m in enumerate(row["conversations"], start=1):
            role = SHAREGPT_ROLES.get(m.get("from"))
            if role is None:
                raise DataError(f"{where}: field 'conversations': message {j}: unknown 'from' {json.dumps(m.get('from'))} "
                                f"(known: {', '.join(SHAREGPT_ROLES)})")
            out.append({"role": role, "content": m.get("value") or ""})
        return out
    raise DataError(f"{where}: field 'messages' is missing (or 'conversations' in ShareGPT's form)")


def convert(rows, *, label_field: str = "label", threshold: float = 0.5, turn_label_field: str | None = None,
            weight_field: str | None = None, source: str = "<rows>") -> tuple[list[dict], int]:
    """(KTO conversation rows, rows left out for having no feedback)."""
    out, skipped = [], 0
    for i, row in enumerate(rows, start=1):
        where = f"{source}: row {i}"
        messages = _messages(row, where)
        kto: dict = {"messages": messages}
        if turn_label_field:
            rated = False
            for j, m in enumerate(messages, start=1):
                turn = _label(m.pop(turn_label_field, None), threshold, f"{where}: message {j}: field '{turn_label_field}'")
                if turn is not None and m["role"] == "assistant":
                    m["label"], rated = turn, True
            if not rated:
                skipped += 1
                continue
        else:
            label = _label(row.get(label_field), threshold, f"{where}: field '{label_field}'")
            if label is None:
                skipped += 1
                continue
            kto["label"] = label
        if weight_field and row.get(weight_field) is not None:
            kto["weight"] = row[weight_field]
        if row.get("tools") is not None:
            kto["tools"] = row["tools"]
        out.append(kto)
    return out, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help=".jsonl/.json/.parquet file, save_to_disk folder or hub name")
    ap.add_argument("output", help="KTO conversation rows written as JSON lines")
    ap.add_argument("--label-field", default="label", help="the row's feedback (bool or number)")
    ap.add_argument("--threshold", type=float, default=0.5, help="a numeric feedback >= this is desirable")
    ap.add_argument("--turn-label-field", default=None, help="feedback on each assistant message instead")
    ap.add_argument("--weight-field", default=None, help="a row's confidence, written as its weight")
    args = ap.parse_args(argv)
    try:
        ds = read_source(args.input)
        rows, skipped = convert(ds, label_field=args.label_field, threshold=args.threshold,
                                turn_label_field=args.turn_label_field, weight_field=args.weight_field,
                                source=args.input)
    except MegaktoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_jsonl(args.output, rows)
    if args.turn_label_field:
        turns = [m["label"] for r in rows for m in r["messages"] if "label" in m]
        what = f"{len(turns)} rated turns ({sum(turns)} desirable, {len(turns) - sum(turns)} undesirable)"
    else:
        n_des = sum(r["label"] for r in rows)
        what = f"{n_des} desirable, {len(rows) - n_des} undesirable"
    print(f"in: {len(ds)} conversations; out: {len(rows)} rows ({what}); {skipped} without feedback left out "
          f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
