"""Writing converted rows, for the data converters (tools/pairs_to_kto.py, tools/conversations_to_kto.py)."""

from __future__ import annotations

import json

__all__ = ["write_jsonl"]


def write_jsonl(path: str, rows) -> None:
    """One JSON object per line, UTF-8 kept as written."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
