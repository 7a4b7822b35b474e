"""tools/conversations_to_kto.py: rated chat logs -> KTO conversation rows that load_rows takes."""

import json

import datasets
import pytest

from megakto.errors import DataError
from tests.launcher import load_script

tool = load_script("tools/conversations_to_kto.py", "conversations_to_kto")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


CHAT = [{"role": "user", "content": "sort 3 1"}, {"role": "assistant", "content": "1 3"}]


def test_row_feedback_as_bool_or_a_number_against_the_threshold():
    rows = [{"messages": CHAT, "label": True}, {"messages": CHAT, "label": 0.2}, {"messages": CHAT, "label": 4},
            {"messages": CHAT, "label": None}]
    out, skipped = tool.convert(rows, threshold=3)
    assert [r["label"] for r in out] == [True, False, True] and skipped == 1
    assert out[0] == {"messages": CHAT, "label": True}


def test_sharegpt_rows_map_their_roles():
    row = {"conversations": [{"from": "system", "value": "brief"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "{\"name\": \"f\"}"}, {"from": "observation", "value": "ok"},
                             {"from": "gpt", "value": "done"}], "score": 1}
    (out,), _ = tool.convert([row], label_field="score")
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    with pytest.raises(DataError, match=r"^x: row 1: field 'conversations': message 1: unknown 'from' \"bot\""):
        tool.convert([{"conversations": [{"from": "bot", "value": "a"}], "label": True}], source="x")


def test_turn_ratings_become_turn_labels_and_weights_and_tools_are_kept():
    """Ratings 5 and 1 on the two assistant turns with threshold 3: labels true and false on the
    turns, none on the row; a rating on a user message is dropped."""
    messages = [{"role": "user", "content": "sort 3 1", "rating": 2}, {"role": "assistant", "content": "1 3", "rating": 5},
                {"role": "user", "content": "sort 9 2"}, {"role": "assistant", "content": "9 2", "rating": 1}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    rows = [{"messages": messages, "confidence": 0.5, "tools": tools}, {"messages": CHAT}]
    out, skipped = tool.convert(rows, turn_label_field="rating", threshold=3, weight_field="confidence")
    assert skipped == 1 and len(out) == 1
    assert [m.get("label") for m in out[0]["messages"]] == [None, True, None, False]
    assert "label" not in out[0] and out[0]["weight"] == 0.5 and out[0]["tools"] == tools
    assert all("rating" not in m for m in out[0]["messages"])


def test_bad_feedback_is_one_line_naming_the_row():
    with pytest.raises(DataError) as err:
        tool.convert([{"messages": CHAT, "label": "great"}], source="chats.jsonl")
    assert str(err.value) == "chats.jsonl: row 1: field 'label': expected a bool or a number, got \"great\""


def test_cli_output_loads_and_tokenizes_as_conversations(tmp_path, capsys):
    from megakto.data.rows import load_rows

    src, out = tmp_path / "chats.jsonl", tmp_path / "kto.jsonl"
    src.write_text("".join(json.dumps({"messages": CHAT, "thumbs": t}) + "\n" for t in (True, False, None)))
    assert tool.main([str(src), str(out), "--label-field", "thumbs"]) == 0
    assert capsys.readouterr().out.strip().endswith(
        f"in: 3 conversations; out: 2 rows (1 desirable, 1 undesirable); 1 without feedback left out -> {out}")
    rows = load_rows(str(out))
    assert rows["label"][:] == [True, False] and rows.column_names[-1] == "conversation"
