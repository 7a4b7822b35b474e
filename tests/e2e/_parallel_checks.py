"""What the tensor- and pipeline-parallel end-to-end tests compare, and their kill -9 harness."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.e2e.conftest import base_overrides
from tests.launcher import REPO, launcher_command, rank_env

__all__ = ["jsonl", "same_steps", "close_weights", "kill_and_resume"]


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def same_steps(got, want, steps, *, kl_abs=1e-6, start=0):
    """Loss, KL, margin and gradient norm of the first ``steps`` steps, and the rows they used;
    ``start``: ``got`` holds ``want``'s steps from that one on (a resumed run)."""
    for step in range(steps):
        a, b = got["history"][step], want["history"][start + step]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), step
        assert a["kl"] == pytest.approx(b["kl"], abs=kl_abs), step
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6), step
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), step
    assert got["indices"][:steps] == want["indices"][start:start + steps]


def close_weights(got, want):
    # Adam divides each element by its own gradient scale, so float rounding of another split of
    # the matmuls or another reduction order moves an element with a near-zero gradient by a few
    # 1e-6 (as for DP invariance).
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=5e-6, msg=name)


def _start(ds, overrides, dump, hang_before_step=None):
    os.makedirs(dump, exist_ok=True)
    args = ["--deepspeed", ds, "--dump", str(dump)]
    if hang_before_step:
        args += ["--hang-before-step", str(hang_before_step)]
    cmd = launcher_command(os.path.join(REPO, "tests/e2e/run_trainer.py"), [*args, *overrides], nproc=2)
    log = open(os.path.join(dump, "launcher.log"), "w")
    return subprocess.Popen(cmd, cwd=REPO, env=rank_env(None), stdout=log, stderr=subprocess.STDOUT)


def kill_and_resume(assets, tmp_path, *, ds, settings, kill_before_step):
    """A 2-rank run with ``settings`` is killed (SIGKILL of rank 1) while both ranks wait to start
    ``kill_before_step``, then resumed with train.resume=auto in the same output dir; returns
    (output dir, the resumed run's result)."""
    out = tmp_path / "run"
    proc = _start(ds, base_overrides(assets, out, **settings), tmp_path / "dumpA", hang_before_step=kill_before_step)
    deadline = time.time() + 300
    while not all(os.path.exists(tmp_path / "dumpA" / f"hanging_rank{r}") for r in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, open(tmp_path / "dumpA" / "launcher.log").read()[-3000:]
        time.sleep(0.5)
    os.kill(int((tmp_path / "dumpA" / "pid_rank1").read_text()), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    proc = _start(ds, base_overrides(assets, out, **settings, **{"train.resume": "auto"}), tmp_path / "dumpB")
    assert proc.wait(timeout=300) == 0, open(tmp_path / "dumpB" / "launcher.log").read()[-3000:]
    with open(tmp_path / "dumpB" / "result.json") as f:
        return out, json.load(f)
