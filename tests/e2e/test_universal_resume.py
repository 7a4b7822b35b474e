"""Resume at another number of ranks through DeepSpeed's universal checkpoints (megakto/checkpoint/universal.py),
under the real launcher on CPU over gloo.

One uninterrupted 8-step run per ZeRO stage (ZeRO-3 on 4 ranks, ZeRO-1 on 2) saves a checkpoint at step 4 and is the
reference: its losses, KL, margins, gradient norms, rows and final weights. Its step-4 checkpoint is
then resumed to step 8

    ZeRO-3  on 2 ranks (the trainer converts it itself) and on 1 rank (converted first with
            tools/to_universal.py, which the HF export then reads as any checkpoint)
    ZeRO-1  from a 2-rank run on 1 rank (its UNIVERSAL_CHECKPOINT_INFO was written at save time;
            2 ranks, not 4, to keep the suite's time: the converter path is the same)
    TP2     ZeRO-3 at tp 2 × dp 2 on 4 ranks, resumed at tp 2 × dp 1 on 2 (AutoTP's shards joined by
            its affine maps; optim.eps=1e-4, so rounding is not amplified)

and steps 5-8 must use the reference's rows (so steps 1-8 see 128 distinct rows of the 800) and
give its numbers to fp32 tolerance (another data-parallel size sums in another order). A resume
with another global batch size stops with one line before anything loads; another model's
checkpoint is refused before converting in tests/checkpoint/test_manager.py, and pipeline and
tensor-parallel layouts on manifests (tests/checkpoint).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.e2e._parallel_checks import close_weights, same_steps
from tests.e2e.conftest import base_overrides, run_trainer
from tests.launcher import REPO, launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

RUN = {"train.max_steps": 8, "checkpoint.every_steps": 4, "checkpoint.keep_last": 2}
KL_ABS = 5e-6  # the KL sum over a batch of ~1 nat, in another reduction order


def _reference(assets, tmp_path_factory, stage, nproc, **settings):
    out = tmp_path_factory.mktemp(f"{stage}_{nproc}ranks")
    _, result = run_trainer(assets, out, nproc=nproc, ds=f"ds_configs/{stage}.json", **RUN, **settings)
    return {"out": out, "result": result, "tag": str(out / "checkpoints" / "step-00000004"), "ds": stage,
            "settings": settings}


@pytest.fixture(scope="module")
def zero3(assets, tmp_path_factory):
    return _reference(assets, tmp_path_factory, "zero3", 4)


@pytest.fixture(scope="module")
def zero1(assets, tmp_path_factory):
    return _reference(assets, tmp_path_factory, "zero1", 2)


@pytest.fixture(scope="module")
def tp2(assets, tmp_path_factory):
    return _reference(assets, tmp_path_factory, "zero3", 4, **{"parallel.tp_size": 2, "optim.eps": 1e-4})


def _resume(assets, ref, tmp_path, nproc, resume):
    proc, result = run_trainer(assets, tmp_path, nproc=nproc, ds=f"ds_configs/{ref['ds']}.json",
                               **{**RUN, **ref["settings"], "train.resume": resume})
    return proc.stdout + proc.stderr, result


def _continues(ref, result, out):
    """Steps 5-8 are the 4-rank run's: rows, numbers and final weights."""
    want = ref["result"]
    assert len(result["history"]) == 4
    same_steps(result, want, 4, kl_abs=KL_ABS, start=4)
    rows = [i for ix in want["indices"][:4] + result["indices"] for i in ix]
    assert len(rows) == len(set(rows)) == 8 * 16  # no row twice, none skipped, within the epoch
    close_weights(torch.load(out / "dump" / "policy.pt", weights_only=True),
                  torch.load(ref["out"] / "dump" / "policy.pt", weights_only=True))


def test_zero3_resumes_on_2_ranks_converting_itself(assets, zero3, tmp_path):
    log, result = _resume(assets, zero3, tmp_path, 2, zero3["tag"])
    converted = tmp_path / "checkpoints" / "universal-step-00000004"
    assert f"converted {zero3['tag']} (4 ranks) -> {converted} for 2 ranks" in log
    assert f"resumed from {zero3['tag']} at step 4 through {converted} (4 ranks then, 2 now)" in log
    manifest = json.loads((converted / "complete").read_text())
    assert (manifest["format"], manifest["source"], manifest["world_size"], manifest["step"]) == \
        ("universal", zero3["tag"], 4, 4)
    assert "zero/model.norm.weight/exp_avg_sq.pt" in manifest["files"] and "trainer_state_rank0.pt" in manifest["files"]
    _continues(zero3, result, tmp_path)


def test_zero3_resumes_on_1_rank_from_the_conversion_tool(assets, zero3, tmp_path):
    from megakto.checkpoint import read_weights

    target = tmp_path / "by_tool" / "universal-step-00000004"
    proc = subprocess.run([sys.executable, "tools/to_universal.py", str(zero3["out"] / "checkpoints"), str(target),
                           "--tag", "step-00000004"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {target} from {zero3['tag']} (4 ranks)" in proc.stdout
    # The export reads it as any checkpoint: the 4-rank ZeRO partitions' weights, bitwise.
    got, want = read_weights(str(target)), read_weights(zero3["tag"])
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    log, result = _resume(assets, zero3, tmp_path / "run", 1, str(target))
    assert f"resumed from {target} at step 4 (4 ranks then, 1 now)" in log and "converted " not in log
    _continues(zero3, result, tmp_path / "run")


def test_zero1_resumes_on_1_rank(assets, zero1, tmp_path):
    log, result = _resume(assets, zero1, tmp_path, 1, zero1["tag"])
    assert "(2 ranks then, 1 now)" in log
    _continues(zero1, result, tmp_path)


def test_tp2_zero3_resumes_at_another_data_parallel_size(assets, tp2, tmp_path):
    """TP2 × DP2 -> TP2 × DP1: converted by the trainer (ds_to_universal joins each tp rank's shards;
    the norms AutoTP leaves whole are mapped with their real shape), then steps 5-8 are the 4-rank
    run's; the universal folder holds both tp ranks' trainer states and the checkpoint's weights."""
    from megakto.checkpoint import read_weights

    log, result = _resume(assets, tp2, tmp_path, 2, tp2["tag"])
    converted = tmp_path / "checkpoints" / "universal-step-00000004"
    assert f"resumed from {tp2['tag']} at step 4 through {converted} (4 ranks then, 2 now)" in log
    manifest = json.loads((converted / "complete").read_text())
    assert (manifest["tp_size"], manifest["world_size"]) == (2, 4)
    assert {"trainer_state_rank0.pt", "trainer_state_rank1.pt"} <= set(manifest["files"])
    got, want = read_weights(str(converted)), read_weights(tp2["tag"])
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    _continues(tp2, result, tmp_path)


def _refused(assets, tmp_path, **settings):
    proc = launch("launch/train_kto.py", ["--deepspeed", "ds_configs/zero3.json",
                                          *base_overrides(assets, tmp_path, **{**RUN, **settings})], nproc=1,
                  timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "megakto: error:" in line]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_changed_global_batch_size_is_refused(assets, zero3, tmp_path):
    line = _refused(assets, tmp_path, **{"train.resume": zero3["tag"], "train.global_batch_size": 8})
    assert line.endswith(f"train.resume: {zero3['tag']} was trained with train.global_batch_size=16 but this run has "
                         "8; the data stream continues only at the same global batch size: set "
                         "train.global_batch_size=16 (the ranks and micro-batch size may change)")
    assert not os.path.exists(tmp_path / "checkpoints" / "universal-step-00000004")  # refused before converting
