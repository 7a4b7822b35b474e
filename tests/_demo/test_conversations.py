"""The sorting demo as conversations (megakto/_demo/conversations.py)."""

from megakto._demo.conversations import make_conversation_rows
from megakto._demo.data import is_desirable


def _pairs(messages):
    return [(messages[k]["content"], messages[k + 1]["content"]) for k in range(0, len(messages), 2)]


def test_each_conversation_has_a_twin_that_breaks_exactly_one_turn():
    rows = make_conversation_rows(20, turns=3, seed=1)
    assert len(rows) == 40
    for good, bad in zip(rows[::2], rows[1::2]):
        assert (good["label"], bad["label"]) == (True, False)
        g, b = _pairs(good["messages"]), _pairs(bad["messages"])
        assert [p for p, _ in g] == [p for p, _ in b] and len(g) == 3
        assert all(is_desirable(p, c) for p, c in g)
        assert sum(not is_desirable(p, c) for p, c in b) == 1


def test_turn_labels_mark_the_broken_turn_false_and_the_row_has_no_label():
    rows = make_conversation_rows(10, seed=2, turn_labels=True)
    for row in rows:
        assert "label" not in row
        for m in row["messages"]:
            if m["role"] == "assistant":
                assert m["label"] == is_desirable(row["messages"][row["messages"].index(m) - 1]["content"], m["content"])
