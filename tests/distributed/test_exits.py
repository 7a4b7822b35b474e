"""How a rank leaves after a failure the other ranks do not share (megakto.distributed.comm.abort):
at once, without tearing the process group down, so that peers waiting in a collective are ended by
the launcher instead of by the collective timeout. gloo cannot reproduce NCCL's blocking teardown,
so the launch test pins the path: the failing rank never calls ``destroy_process_group``."""

import time

import psutil
import pytest

from tests.launcher import launch

pytestmark = pytest.mark.gloo


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_rank_that_fails_alone_ends_every_rank_within_seconds(tmp_path):
    proc = launch("tests/distributed/_fails_alone_worker.py",
                  ["--deepspeed", "unused.json", "model.path=unused", "data.train_files=[unused.jsonl]",
                   "dist.timeout_minutes=3"], nproc=2, timeout=120,
                  env={"MEGAKTO_TEST_DUMP": str(tmp_path)})
    ended = time.time()
    output = proc.stdout + proc.stderr
    assert (tmp_path / "raised_rank1").exists(), output[-4000:]
    # The launcher saw rank 1's exit and ended rank 0: far below the 3-minute collective timeout.
    assert ended - float((tmp_path / "raised_rank1").read_text()) < 10, output[-4000:]
    assert proc.returncode == 1, (proc.returncode, output[-4000:])
    pids = [int((tmp_path / f"pid_rank{r}").read_text()) for r in (0, 1)]
    assert all(_gone(pid) for pid in pids)
    # Neither rank tore the group down (under NCCL that can block until the timeout), and neither
    # returned from main: both left through comm.abort.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("destroyed", "returned"))) == []
    # One error line, the failing rank's; rank 0 says why it stopped without an error line of its own.
    lines = [line for line in output.splitlines() if "megakto: error" in line]
    assert len(lines) == 1, output[-4000:]
    assert lines[0].startswith("megakto: error: rank 1: unexpected RuntimeError: CUDA out of memory"), lines
    assert "megakto: rank 0: stopped: a collective failed" in output, output[-4000:]
    assert "terminate called" not in output
    # DeepSpeed gave the process group the configured timeout (read back from the backend).
    assert "rank 0: process group: gloo, 2 ranks, collective timeout 3 min" in output, output[-4000:]
