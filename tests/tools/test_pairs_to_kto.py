import json
import os
import subprocess
import sys

import datasets
import pytest

from megakto.errors import DataError
from tests.launcher import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "pairs_to_kto.py")
pairs_to_kto = load_script("tools/pairs_to_kto.py", "pairs_to_kto")
convert = pairs_to_kto.convert


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # for the CLI runs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _pairs(n, n_prompts=None):
    n_prompts = n_prompts or n
    return [{"prompt": f"p{i % n_prompts}", "chosen": f"good{i}", "rejected": f"bad{i}"}
            for i in range(n)]


def _counts(rows):
    n_des = sum(r["label"] for r in rows)
    return n_des, len(rows) - n_des


def test_default_gives_two_rows_per_pair_in_order():
    rows = convert(_pairs(3))
    assert rows == [
        {"prompt": "p0", "completion": "good0", "label": True},
        {"prompt": "p0", "completion": "bad0", "label": False},
        {"prompt": "p1", "completion": "good1", "label": True},
        {"prompt": "p1", "completion": "bad1", "label": False},
        {"prompt": "p2", "completion": "good2", "label": True},
        {"prompt": "p2", "completion": "bad2", "label": False},
    ]


def test_one_y_per_x_keeps_one_row_per_prompt():
    """10 pairs over 4 distinct prompts -> exactly 4 rows, each taken from one of its own pairs."""
    pairs = _pairs(10, n_prompts=4)
    rows = convert(pairs, one_y_per_x=True, seed=3)
    assert [r["prompt"] for r in rows] == ["p0", "p1", "p2", "p3"]
    for r in rows:
        mine = [p for p in pairs if p["prompt"] == r["prompt"]]
        key = "chosen" if r["label"] else "rejected"
        assert r["completion"] in [p[key] for p in mine]
    assert convert(pairs, one_y_per_x=True, seed=3) == rows  # seeded
    outputs = {json.dumps(convert(pairs, one_y_per_x=True, seed=s)) for s in range(10)}
    assert len(outputs) > 1  # the coin does depend on the seed


def test_desirable_fraction_drops_only_the_over_represented_class():
    """40 pairs -> 40 desirable + 40 undesirable. F = 0.25: desirable is over-represented, keep
    all 40 undesirable and round(0.25 * 40 / 0.75) = round(13.33) = 13 desirable (13/53 = 0.245)."""
    rows = convert(_pairs(40), desirable_fraction=0.25, seed=0)
    assert _counts(rows) == (13, 40)
    assert sum(1 for r in rows if not r["label"]) == 40
    assert [r["completion"] for r in rows if not r["label"]] == [f"bad{i}" for i in range(40)]
    # F = 0.8: undesirable is over-represented; keep 40 desirable, round(40 * 0.2 / 0.8) = 10
    assert _counts(convert(_pairs(40), desirable_fraction=0.8, seed=0)) == (40, 10)
    # F = 0.5 on a balanced set changes nothing
    assert convert(_pairs(40), desirable_fraction=0.5) == convert(_pairs(40))


def test_desirable_fraction_after_one_y_per_x():
    """Seed 1 keeps 17 chosen and 23 rejected of 40 pairs. F = 0.0909 (1:10): keep the 23
    undesirable and round(0.0909 * 23 / 0.9091) = round(2.30) = 2 desirable."""
    assert _counts(convert(_pairs(40), one_y_per_x=True, seed=1)) == (17, 23)
    rows = convert(_pairs(40), one_y_per_x=True, desirable_fraction=0.0909, seed=1)
    assert _counts(rows) == (2, 23)


def test_missing_chosen_names_the_row():
    pairs = _pairs(3)
    pairs[1]["chosen"] = None
    with pytest.raises(DataError) as err:
        convert(pairs, source="pairs.jsonl")
    assert str(err.value) == "pairs.jsonl: row 2: field 'chosen' is missing"


@pytest.mark.e2e
def test_cli_writes_rows_that_load_rows_accepts(tmp_path):
    from megakto.data.rows import count_labels, load_rows

    src = str(tmp_path / "pairs.parquet")
    datasets.Dataset.from_list(_pairs(40)).to_parquet(src)
    out = str(tmp_path / "kto.jsonl")
    res = subprocess.run([sys.executable, SCRIPT, src, out, "--desirable-fraction", "0.25"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (f"in: 40 pairs (40 chosen, 40 rejected); out: 53 rows "
                                  f"(13 desirable, 40 undesirable) -> {out}")
    assert count_labels(load_rows(out)) == (13, 40)


@pytest.mark.e2e
def test_cli_missing_rejected_column_is_one_line(tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": "a", "chosen": "b"}) + "\n" for _ in range(2)))
    res = subprocess.run([sys.executable, SCRIPT, str(src), str(tmp_path / "o.jsonl")],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 1
    # the last line; datasets' progress bars may come before it
    assert res.stderr.splitlines()[-1] == (f"error: {src}: row 1: field 'rejected' is missing "
                                           f"(columns: prompt, chosen)")


def _conversation_pairs():
    def conv(last):
        return [{"role": "user", "content": "sort 3 1"}, {"role": "assistant", "content": "1 3"},
                {"role": "user", "content": "sort 9 2"}, {"role": "assistant", "content": last}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    return [{"chosen": conv("2 9"), "rejected": conv("9 2"), "tools": tools},
            {"chosen": conv("2 9")[:2], "rejected": [conv("")[0], {"role": "assistant", "content": "3 1"}]}]


def test_paired_conversations_become_conversation_rows():
    """No prompt column, whole conversations in chosen and rejected: one conversation row each,
    labelled true and false, the tools kept; one-y-per-x groups by the shared first messages
    (both pairs open with the same user turn, and the first also shares its first answer)."""
    pairs = _conversation_pairs()
    rows = convert(pairs)
    assert rows == [{"messages": pairs[0]["chosen"], "label": True, "tools": pairs[0]["tools"]},
                    {"messages": pairs[0]["rejected"], "label": False, "tools": pairs[0]["tools"]},
                    {"messages": pairs[1]["chosen"], "label": True},
                    {"messages": pairs[1]["rejected"], "label": False}]
    assert pairs_to_kto._shared_prompt(pairs[0]) == pairs[0]["chosen"][:3]
    assert pairs_to_kto._shared_prompt(pairs[1]) == pairs[1]["chosen"][:1]
    assert len(convert(pairs, one_y_per_x=True)) == 2  # the shared prefixes differ


def test_paired_conversations_load_as_conversations(tmp_path):
    from megakto.data.rows import load_rows

    out = tmp_path / "kto.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in convert(_conversation_pairs())))
    rows = load_rows(str(out))
    assert rows["label"][:] == [True, False, True, False]
    assert json.loads(rows["conversation"][1])["messages"][3] == {"role": "assistant", "content": "9 2"}


def test_cli_takes_paired_conversations_without_a_prompt_column(tmp_path, capsys):
    src, out = tmp_path / "pairs.jsonl", tmp_path / "kto.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _conversation_pairs()))
    assert pairs_to_kto.main([str(src), str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"out: 4 rows (2 desirable, 2 undesirable) -> {out}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [True, False, True, False] and all("messages" in r for r in rows)


def test_cli_string_pairs_without_a_prompt_column_name_the_prompt(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    assert pairs_to_kto.main([str(src), str(tmp_path / "o.jsonl")]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # datasets' progress bars may come before it
    assert last == f"error: {src}: row 1: field 'prompt' is missing (columns: chosen, rejected)"
