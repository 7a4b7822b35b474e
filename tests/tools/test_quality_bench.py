"""tools/quality_bench.py's pure parts: method names, per-task SFT steps, and the two forms of a
task's data (the bench itself measures and is run by hand; see docs/quality.md)."""

import json

import pytest

from tests.launcher import load_script

qb = load_script("tools/quality_bench.py", "megakto_tools_quality_bench")


def test_methods():
    assert qb.parse_method("kto", 1e-4) == {"kind": "kto", "lr": 1e-4, "overrides": []}
    assert qb.parse_method("kto-lr3", 1e-4) == {"kind": "kto", "lr": pytest.approx(3e-4), "overrides": []}
    assert qb.parse_method("kto@kto.kl_scope=microbatch@train.micro_batch_size=2", 1e-4)["overrides"] == [
        "kto.kl_scope=microbatch", "train.micro_batch_size=2"]
    with pytest.raises(SystemExit, match="unknown method 'ipo'"):
        qb.parse_method("ipo", 1e-4)
    with pytest.raises(SystemExit, match="overrides apply to megakto methods only"):
        qb.parse_method("dpo@kto.beta=1", 1e-4)


def test_sft_steps_per_task():
    assert qb._per_task("100", ["sort", "add"]) == {"sort": 100, "add": 100}
    assert qb._per_task("sort=3,add=5", ["add"]) == {"add": 5}
    with pytest.raises(SystemExit, match="names no steps for copy"):
        qb._per_task("sort=3", ["sort", "copy"])


def test_rows_and_pairs_are_the_same_data(tmp_path):
    paths = qb.write_task_data("add", tmp_path, n_train=20, n_eval=5, n_sft=7, seed=0)
    rows = [json.loads(line) for line in open(paths["rows"])]
    pairs = [json.loads(line) for line in open(paths["pairs"])]
    sft = [json.loads(line) for line in open(paths["sft"])]
    held_out = json.load(open(paths["eval"]))
    assert len(rows) == 40 and len(pairs) == 20 and len(sft) == 7 and len(held_out) == 5
    for pair, good, bad in zip(pairs, rows[::2], rows[1::2]):  # each prompt: a desirable row, then an undesirable one
        assert good["label"] and not bad["label"] and pair["prompt"] == good["prompt"] == bad["prompt"]
        assert (pair["chosen"], pair["rejected"]) == (" " + good["completion"], " " + bad["completion"])
    prompts = [{r["prompt"] for r in rows}, {r["prompt"] for r in sft}, {p for p, _, _ in held_out}]
    assert sum(map(len, prompts)) == len(set().union(*prompts)) == 32  # the splits share no prompt
    assert all(r["label"] for r in sft)  # SFT on correct answers only
