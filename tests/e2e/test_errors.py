"""Bad input under the real launcher (2 ranks): one line naming the key/file/row/field, printed once,
every rank exits non-zero, nothing hangs (the test timeout would catch a hang)."""

import json

import pytest

from tests.e2e.conftest import base_overrides
from tests.launcher import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _run(assets, tmp_path, *extra, ds="ds_configs/zero3.json"):
    args = ["--deepspeed", ds, *base_overrides(assets, tmp_path / "out"), *extra]
    proc = launch("launch/train_kto.py", args, nproc=2, timeout=200)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if "megakto: error:" in line]
    return proc, lines, output


def _assert_one_error(proc, lines, output, *fragments):
    # Exactly 1: a rank that aborts at exit (its process group left alive) makes the launcher return
    # another status, e.g. 250 after "terminate called without an active exception".
    assert proc.returncode == 1, (proc.returncode, output[-4000:])
    assert "terminate called" not in output, output[-4000:]
    assert len(lines) == 1, output[-4000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in output, output[-4000:]


def test_unknown_config_key(assets, tmp_path):
    proc, lines, output = _run(assets, tmp_path, "train.max_step=3")
    _assert_one_error(proc, lines, output, "unknown config key 'train.max_step'", "max_steps")


def test_batch_mismatch(assets, tmp_path):
    proc, lines, output = _run(assets, tmp_path, "train.global_batch_size=12")
    _assert_one_error(proc, lines, output, "train.global_batch_size=12", "4 × 2 = 8")


def test_deepspeed_json_disagrees(assets, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 32}))
    proc, lines, output = _run(assets, tmp_path, ds=str(ds))
    _assert_one_error(proc, lines, output, str(ds), "train_batch_size=32", "train.global_batch_size=16")


def test_missing_model_path(assets, tmp_path):
    proc, lines, output = _run(assets, tmp_path, f"model.path={tmp_path}/no-such-model")
    _assert_one_error(proc, lines, output, "model.path=", "no-such-model", "no such model folder")


def test_bad_data_row(assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": f"p{i}", "completion": "c", "label": i % 2 == 0} for i in range(20)]
    rows[6]["label"] = "yes"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc, lines, output = _run(assets, tmp_path, f"data.train_files={bad}")
    _assert_one_error(proc, lines, output, str(bad), "row 7", "label")


def test_one_class_data(assets, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c", "label": True}) + "\n" for i in range(20)))
    proc, lines, output = _run(assets, tmp_path, f"data.train_files={one}")
    _assert_one_error(proc, lines, output, str(one), "desirable", "kto.allow_single_class")


def test_output_dir_is_a_file(assets, tmp_path):
    """Used to be a NotADirectoryError from the run logger on rank 0 alone, outside fail_together."""
    target = tmp_path / "a_file"
    target.write_text("not a folder\n")
    proc, lines, output = _run(assets, tmp_path, f"output_dir={target}")
    _assert_one_error(proc, lines, output, f"output_dir={target}", "is a file, not a folder")


def test_tp_size_does_not_divide_the_vocabulary(assets, tmp_path):
    from megakto._demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "odd_vocab", vocab_size=513)
    proc, lines, output = _run(assets, tmp_path, f"model.path={model}", "parallel.tp_size=2")
    _assert_one_error(proc, lines, output, f"model.path={model}: parallel.tp_size=2 does not divide the vocabulary: "
                      "vocab_size=513", "pad_to_multiple_of=2")
