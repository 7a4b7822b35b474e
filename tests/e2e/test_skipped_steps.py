"""Non-finite steps under the real launcher (2 ranks, ZeRO-3, CPU): counted, warned about, and after
``train.max_skipped_steps`` in a row the run stops with one line and exit 1, saving nothing.

kto.beta=1e38 keeps the loss finite (1 - sigmoid(beta * 0) = 0.5 at the start) but overflows its
gradient to inf, so DeepSpeed's ZeRO-3 optimizer discards every step: the case that used to train
nothing, save a checkpoint and exit 0."""

import json
import math
import os

import pytest

from tests.e2e.conftest import base_overrides
from tests.launcher import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _files(folder):
    """{relative path: (size, mtime_ns)} of everything under ``folder``."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            st = os.stat(path)
            found[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return found


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _run(assets, out, **extra):
    proc = launch("launch/train_kto.py", ["--deepspeed", "ds_configs/zero3.json",
                                          *base_overrides(assets, out, **extra)], nproc=2, timeout=400)
    return proc, proc.stdout + proc.stderr


def _errors(output):
    return [line for line in output.splitlines() if "megakto: error:" in line]


def test_overflowing_gradients_stop_the_run_before_any_save(assets, tmp_path):
    """The reported run: kto.beta=1e38 from the start, every step discarded by DeepSpeed."""
    out = tmp_path / "out"
    proc, output = _run(assets, out, **{"train.max_steps": 8, "checkpoint.every_steps": 1, "kto.beta": 1e38})
    assert proc.returncode == 1, output[-4000:]
    reason = "non-finite gradient norm (inf), update discarded by DeepSpeed"
    assert _errors(output) == [f"megakto: error: 3 consecutive optimizer steps skipped (steps 1-3, last: {reason}); "
                               "stopped at train.max_skipped_steps=3 without saving, the last checkpoint is as it "
                               "was; lower optim.lr or kto.beta, or look for bad rows"], output[-4000:]
    warnings = [line for line in output.splitlines() if "warning: step" in line]
    assert len(warnings) == 1, output[-4000:]
    assert f"warning: step 1 skipped, weights not updated: {reason}" in warnings[0]
    assert "optim.lr=0.0003, kto.beta=1e+38" in warnings[0]
    for step in (1, 2, 3):
        assert f"step {step} skipped: {reason}; skipped_steps {step}" in output
    assert "Traceback" not in output and "terminate called" not in output, output[-4000:]
    ckpts = out / "checkpoints"
    assert not ckpts.exists() or not [p for p in os.listdir(ckpts) if p.startswith(("step-", ".tmp-step-"))]
    scalars = _scalars(os.path.join(out, "tensorboard"))
    assert scalars["train/skipped_steps"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert scalars["grad_norm"] == [(1, float("inf")), (2, float("inf")), (3, float("inf"))]


def test_nonfinite_loss_is_skipped_without_backward_and_keeps_the_checkpoint(assets, tmp_path):
    """A good step saved, then a resume with kto.sft_weight=inf: every micro-batch's loss is inf
    (or NaN where it holds no desirable row); the loss flag, reduced over both ranks, stops each
    step before its backward, and no save follows."""
    out = tmp_path / "out"
    good, output = _run(assets, out, **{"train.max_steps": 1, "checkpoint.every_steps": 1})
    assert good.returncode == 0, output[-4000:]
    ckpts = out / "checkpoints"
    before = _files(ckpts)
    assert any(p.startswith("step-00000001" + os.sep) for p in before), sorted(before)

    proc, output = _run(assets, out, **{"train.max_steps": 8, "checkpoint.every_steps": 1, "train.resume": "auto",
                                        "kto.sft_weight": "inf", "train.max_skipped_steps": 2})
    assert proc.returncode == 1, output[-4000:]
    assert _errors(output) == ["megakto: error: 2 consecutive optimizer steps skipped (steps 2-3, last: non-finite "
                               "loss); stopped at train.max_skipped_steps=2 without saving, the last checkpoint is "
                               "as it was; lower optim.lr or kto.beta, or look for bad rows"], output[-4000:]
    assert "warning: step 2 skipped, weights not updated: non-finite loss" in output
    assert "step 3 skipped: non-finite loss; skipped_steps 2" in output
    assert "Traceback" not in output and "terminate called" not in output, output[-4000:]
    assert _files(ckpts) == before  # nothing written, moved or pruned since the good step


@pytest.mark.parametrize("ds, extra", [("ds_configs/zero3.json", {}),
                                       ("ds_configs/zero1.json", {"parallel.pp_size": 2, "train.micro_batch_size": 8})],
                         ids=["zero3", "pipeline"])
def test_nan_in_a_later_micro_batch_discards_the_whole_step_and_training_resumes(assets, tmp_path, ds, extra):
    """Gradient accumulation 2: step 2's first micro-batch has already run its backward when the
    second one's loss turns out NaN. megakto makes that backward NaN so that DeepSpeed's overflow
    check (ZeRO-3; ZeRO-1 under a pipeline, whose train_batch cannot stop half-way) discards the
    whole accumulated step; step 3 then trains as usual."""
    dump = tmp_path / "steps.json"
    proc = launch("tests/e2e/_nan_microbatch_worker.py", [str(dump), ds,
                                                          *base_overrides(assets, tmp_path / "out", **extra)],
                  nproc=2, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads(dump.read_text())
    assert [(s["skipped"], s["changed"], s["ds_skipped"]) for s in steps] == [
        (None, True, 0), ("non-finite loss", False, 1), (None, True, 1)]
    assert math.isnan(steps[1]["loss"]) and math.isfinite(steps[2]["loss"])
    assert "warning: step 2 skipped, weights not updated: non-finite loss" in proc.stdout + proc.stderr
