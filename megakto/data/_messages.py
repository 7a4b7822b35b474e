"""Check conversation rows (``messages``, ``label``, optional ``tools``) as they come back from
``datasets``, and store each as one JSON string for the tokenizer (megakto/data/conversations.py).

Arrow gives every message of a file the union of the keys any message has, filling the missing
ones with null (a ``tool_calls`` key on every user turn, every argument name on every call), so
null values are dropped before a message reaches a chat template, which tests for keys with
``in``. A message's ``content`` may be missing only on an assistant turn that makes tool calls.
"""

from __future__ import annotations

import json

from megakto.errors import DataError

__all__ = ["is_conversation_source", "check_conversation", "conversation_json"]


def is_conversation_source(columns) -> bool:
    return "messages" in columns and "prompt" not in columns


def _strip_nulls(value):
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _is_bool(value) -> bool:
    return value is True or value is False or (type(value) is int and value in (0, 1))


def check_conversation(messages, label, tools, source: str, i: int, show) -> bool:
    """Check one row; return whether its assistant turns carry labels (one example per turn)."""
    where = f"{source}: row {i}: field 'messages'"
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages, got {show(messages)}")
    labelled = False
    for j, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {j}: expected an object with a 'role', got {show(m)}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise DataError(f"{where}: message {j}: has no 'role' (got {show(_strip_nulls(m))})")
        content, calls = m.get("content"), m.get("tool_calls")
        if not isinstance(content, str) and not (content is None and role == "assistant" and calls):
            raise DataError(f"{where}: message {j}: field 'content': expected a string, got {show(content)}")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            raise DataError(f"{where}: message {j}: field 'tool_calls': expected a list on an assistant turn, "
                            f"got {show(calls)} on a {role} turn")
        turn_label = m.get("label")
        if turn_label is not None:
            if role != "assistant":
                raise DataError(f"{where}: message {j}: a {role} turn carries a 'label'; only assistant turns do")
            if not _is_bool(turn_label):
                raise DataError(f"{where}: message {j}: field 'label': expected a bool (true/false or 0/1), "
                                f"got {show(turn_label)}")
            labelled = True
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(f"{where}: no assistant turn, so nothing to score")
    if roles[0] == "assistant":
        raise DataError(f"{where}: message 1: an assistant turn opens the conversation; it needs a system or "
                        f"user turn before it")
    if labelled and label is not None:
        raise DataError(f"{source}: row {i}: field 'label': the row's assistant turns carry labels, so the row "
                        f"takes none (got {show(label)})")
    if not labelled and not _is_bool(label):
        raise DataError(f"{source}: row {i}: field 'label': expected a bool (true/false or 0/1), got {show(label)} "
                        f"(or label the assistant turns)")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{source}: row {i}: field 'tools': expected a list of JSON schemas, got {show(tools)}")
    return labelled


def conversation_json(messages, tools) -> str:
    """The row as the tokenizer reads it: messages (nulls dropped; turn labels kept) and tools."""
    out = {"messages": [_strip_nulls(m) for m in messages]}
    for m in out["messages"]:
        m.setdefault("content", "")
    if tools is not None:
        out["tools"] = _strip_nulls(tools)
    return json.dumps(out, ensure_ascii=False)
