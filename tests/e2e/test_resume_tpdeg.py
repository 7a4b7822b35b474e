"""Resume at another tensor-parallel size, under the real launcher on CPU over gloo: one pair each
way through the checkpoint's universal form (the whole fp32 masters and Adam moments, which each
target rank cuts for its own tp rank). The whole matrix (TP2 -> ZeRO-3 DP2, TP2 -> TP4, ZeRO-1 and
ZeRO-2 pairs) is tests/e2e/resume_matrix_tpdeg.py, run by tools/resume_matrix.sh.

* tp 1 -> tp 2, across layouts: the one-process ZeRO-3 run of the session (conftest's
  ``single_long``, 6 steps, a checkpoint every 3) resumed from step 3 at TP2 on 2 ranks gives its
  rows, losses, KL and final weights (one launch: the source is shared with
  tests/e2e/test_tensor_parallel.py).
* tp 2 -> tp 1: a TP2 ZeRO-3 run resumed from step 4 on one process (tests/e2e/_resume_pairs.py).
  Its step-4 checkpoint, with AutoTP's replicated maps broken as deepspeed 0.19.8 recorded them
  before megakto fixed them (0 elements), converts again, repaired from the recorded shapes, to the
  same universal tensors bitwise (no launch).

Another tp size computes each sequence's log-probs in another order (the head's vocabulary-parallel
log-sum-exp, the row-parallel sums), so KL is held to 1e-5 (as TP2 against one process in
tests/e2e/test_tensor_parallel.py) and the weights to close_weights' bounds there.
"""

import glob
import os
import shutil

import pytest
import torch

from megakto.checkpoint import universal

from tests.e2e._parallel_checks import close_weights, same_steps
from tests.e2e._resume_pairs import Layout, compare, resume_on, run_source
from tests.e2e.conftest import LONG, run_trainer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

KL_ABS = 1e-5


def _weights(out):
    return torch.load(os.path.join(out, "dump", "policy.pt"), weights_only=True)


def test_zero3_one_process_resumes_at_tp2(assets, single_long, tmp_path):
    s_out, s = single_long
    proc, t = run_trainer(assets, tmp_path, nproc=2, **LONG, **{
        "parallel.tp_size": 2, "data.eval_files": assets["eval"],
        "train.resume": str(s_out / "checkpoints" / "step-00000003")})
    log = proc.stdout + proc.stderr
    assert "converted" in log and "universal-step-00000003" in log
    assert len(t["history"]) == 3
    same_steps(t, s, 3, kl_abs=KL_ABS, start=3)
    close_weights(_weights(tmp_path), _weights(s_out))


def test_tp2_resumes_on_one_process(assets, tmp_path_factory, tmp_path):
    tp2 = Layout("TP2 ZeRO-3 (2 ranks)", 2, settings={"parallel.tp_size": 2})
    tp1 = Layout("ZeRO-3 (1 rank)", 1)
    source = run_source(assets, tmp_path_factory.mktemp("tp2"), tp2)
    _, result = resume_on(assets, source, tmp_path, tp1)
    compare("TP2 -> TP1", source, tp1, result, tmp_path, kl_abs=KL_ABS)
    _repaired_conversion_is_the_same(source["tag"], tmp_path_factory.mktemp("repair"))


def _break_replicated_maps(tag_dir):
    """Give every replicated parameter's AutoTP map 0 elements, as checkpoints saved before
    megakto's fix recorded them under ZeRO-3; returns how many."""
    from deepspeed.checkpoint.affine import replicated_map
    from deepspeed.checkpoint.constants import (AFFINE_MAP, AFFINE_MAP_PARAMS, TP_REPLICATED_PARAMETER_PATTERNS,
                                                UNIVERSAL_CHECKPOINT_INFO)

    broken = 0
    for path in glob.glob(os.path.join(tag_dir, "*_model_states.pt")):
        state = torch.load(path, weights_only=False)
        info = state[UNIVERSAL_CHECKPOINT_INFO]
        maps = info[AFFINE_MAP][AFFINE_MAP_PARAMS]
        for pattern in info[TP_REPLICATED_PARAMETER_PATTERNS]:
            if pattern in maps:
                maps[pattern] = replicated_map((0,), len(maps[pattern]["ranks"])).to_dict()
                broken += 1
        torch.save(state, path)
    return broken


def _repaired_conversion_is_the_same(tag, tmp_path):
    old = tmp_path / "old" / "step-00000004"
    shutil.copytree(tag, old)
    assert _break_replicated_maps(old) >= 2 * 5  # both tp ranks: 4 layer norms, the final norm, ...
    want = universal.convert(tag, str(tmp_path / "want"))
    got = universal.convert(str(old), str(tmp_path / "got"))
    files = sorted(os.path.relpath(p, want) for p in glob.glob(os.path.join(want, "zero", "*", "*.pt")))
    assert files and files == sorted(os.path.relpath(p, got) for p in glob.glob(os.path.join(got, "zero", "*", "*.pt")))
    for name in files:
        a, b = (torch.load(os.path.join(d, name), weights_only=False) for d in (want, got))
        assert torch.equal(a["param"], b["param"]), name
