"""megakto.distributed.comm: every public function outside a process group (unit) and on a real
2-process gloo group (one spawn, shared by the gloo tests through a module fixture).

The gloo worker gives each rank different inputs, so every expected value is a hand-worked sum
or a choice of one rank's object. The explicit ``group`` argument is checked twice: on 2 ranks with
a group per rank holding only that rank (a sum over it is the rank's own value, where the world sum
differs), and on 3 ranks with a pair that leaves rank 2 out, where a collective that fell back to
the world group would count rank 2 (or wait for it).
"""

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from megakto.distributed import comm
from megakto.errors import ConfigError, DataError, MegaktoError
from tests.distributed._gloo import run_on_ranks
from tests.launcher import REPO, free_port

BAD_ROW = "train.jsonl: row 7: field 'label' must be true or false, got 'maybe'"
BAD_KEY = "config key 'optim.schedule' must be one of cosine, linear, constant, got 'step'"


# ----------------------------------------------------------------------------- no process group

@pytest.fixture
def no_launcher_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_identity_without_a_group_reads_the_launcher_env(no_launcher_env):
    assert not comm.is_initialized()
    assert (comm.rank(), comm.world_size(), comm.local_rank(), comm.is_main()) == (0, 1, 0, True)
    no_launcher_env.setenv("RANK", "3")
    no_launcher_env.setenv("WORLD_SIZE", "4")
    no_launcher_env.setenv("LOCAL_RANK", "1")
    assert (comm.rank(), comm.world_size(), comm.local_rank(), comm.is_main()) == (3, 4, 1, False)
    # Group queries describe the (absent) group, not the environment.
    assert (comm.group_size(group=comm.world_group()), comm.group_rank(group=comm.world_group())) == (1, 0)


def test_collectives_without_a_group_are_no_ops():
    t = torch.tensor([1.5, -2.0])
    assert comm.all_reduce_sum(t, group=comm.world_group()) is t and t.tolist() == [1.5, -2.0]
    # Sorted keys, plain floats, float64 arithmetic: 2**30 + 1 would round to 2**30 in float32.
    out = comm.all_reduce_dict({"tokens": 2**30 + 1, "loss": torch.tensor(0.25)}, group=comm.world_group())
    assert list(out) == ["loss", "tokens"] and out == {"loss": 0.25, "tokens": 1073741825.0}
    assert all(type(v) is float for v in out.values())
    obj = {"seed": 17}
    assert comm.broadcast_object(obj, group=comm.world_group()) is obj
    assert comm.barrier(group=comm.world_group()) is None


def test_fail_together_without_a_group(tmp_path):
    with comm.fail_together(group=comm.world_group()):
        pass
    with pytest.raises(MegaktoError, match="^train.jsonl: row 7: field 'label'") as err:
        with comm.fail_together(group=comm.world_group()):
            raise DataError(BAD_ROW)
    assert str(err.value) == BAD_ROW and err.value.shared and type(err.value) is DataError
    missing = tmp_path / "missing.json"
    with pytest.raises(MegaktoError) as err:
        with comm.fail_together(group=comm.world_group()):
            open(missing)
    assert str(err.value) == f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"
    assert err.value.shared and type(err.value) is MegaktoError
    # Anything else is a bug, not a user error: it passes through untouched.
    with pytest.raises(ValueError, match="^bug$") as err:
        with comm.fail_together(group=comm.world_group()):
            raise ValueError("bug")
    assert not hasattr(err.value, "shared")


# ----------------------------------------------------------------------------- 2 ranks over gloo

def _fail_case(rank, raises, group=None):
    """Run ``fail_together(group=group)`` with ``raises[rank]`` raised inside (None: no error; the
    world when ``group`` is None); returns (message, shared, class name) of the MegaktoError the rank
    raised, or None."""
    try:
        with comm.fail_together(group=comm.world_group() if group is None else group):
            if raises[rank] is not None:
                raise raises[rank]
    except MegaktoError as err:
        return str(err), getattr(err, "shared", False), type(err).__name__
    return None


def _exercise(rank, scratch):
    """Every public function of comm on this rank; the collectives run in the same order on both."""
    out = {"identity": (comm.is_initialized(), comm.rank(), comm.world_size(), comm.local_rank(),
                        comm.is_main(), comm.group_size(group=comm.world_group()), comm.group_rank(group=comm.world_group()))}

    t = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([10.0, -0.5])
    out["sum_in_place"] = comm.all_reduce_sum(t, group=comm.world_group()) is t
    out["sum"] = t.tolist()
    out["sum_int"] = comm.all_reduce_sum(torch.tensor([3, 4]) * (rank + 1), group=comm.world_group()).tolist()
    out["sum_world_named"] = comm.all_reduce_sum(torch.tensor([rank + 1.0]), group=dist.group.WORLD).tolist()
    # Different insertion order per rank; the keys are matched by name.
    values = ({"tokens": 2**30, "loss": 1.5, "rows": 4} if rank == 0 else
              {"rows": torch.tensor(3), "loss": torch.tensor(0.25), "tokens": 1})
    out["dict"] = comm.all_reduce_dict(values, group=comm.world_group())

    out["bcast_0"] = comm.broadcast_object({"seed": 17, "files": ["a.jsonl", "b.jsonl"]} if rank == 0 else None,
                                          group=comm.world_group())
    out["bcast_1"] = comm.broadcast_object(("from", rank), src=1, group=comm.world_group())

    # Rank 1 writes a file late; rank 0 looks for it only after the barrier.
    flag = os.path.join(scratch, "written_by_rank1")
    if rank == 1:
        time.sleep(0.5)
        with open(flag, "w"):
            pass
    comm.barrier(group=comm.world_group())
    out["barrier_waited"] = os.path.exists(flag)

    # Explicit groups: the pair (both ranks, a group object other than the default) and one group
    # per rank holding only that rank. Every rank creates every group, in the same order.
    pair = dist.new_group([0, 1])
    own = [dist.new_group([0]), dist.new_group([1])][rank]
    out["pair"] = (comm.group_size(group=pair), comm.group_rank(group=pair),
                   comm.all_reduce_sum(torch.tensor([rank + 1.0]), group=pair).tolist(),
                   comm.broadcast_object(f"rank{rank}", src=1, group=pair))
    comm.barrier(group=pair)
    out["own"] = (comm.group_size(group=own), comm.group_rank(group=own),
                  comm.all_reduce_sum(torch.tensor([5.0 * (rank + 1)]), group=own).tolist(),
                  comm.all_reduce_dict({"n": rank + 1}, group=own),
                  comm.broadcast_object(f"rank{rank}", src=rank, group=own))
    comm.barrier(group=own)
    out["own_fail"] = _fail_case(rank, [None, DataError(BAD_ROW)], own)

    missing = os.path.join(scratch, "missing.json")
    out["fail"] = {
        "none": _fail_case(rank, [None, None]),
        "rank1": _fail_case(rank, [None, DataError(BAD_ROW)]),
        "rank0": _fail_case(rank, [ConfigError(BAD_KEY), None]),
        "both": _fail_case(rank, [ConfigError(BAD_KEY), DataError(BAD_ROW)]),
        "pair_rank1": _fail_case(rank, [None, DataError(BAD_ROW)], pair),
    }
    try:
        with comm.fail_together(group=comm.world_group()):
            if rank == 1:
                open(missing)
    except MegaktoError as err:
        out["fail"]["oserror"] = str(err)
    # A bug (not a MegaktoError) on rank 1: it keeps its own exception, rank 0 stops with one line.
    try:
        with comm.fail_together(group=comm.world_group()):
            if rank == 1:
                raise ValueError("bug")
    except MegaktoError as err:
        out["fail"]["bug"] = (str(err), getattr(err, "shared", False))
    except ValueError as err:
        out["fail"]["bug"] = ("ValueError", str(err), hasattr(err, "shared"))
    # A group left None (a default, a degree-1 group read as the world) is refused before any rank
    # enters a collective, so the ranks stay in step.
    out["none_refused"] = []
    for call in (lambda: comm.all_reduce_sum(torch.tensor([1.0]), group=None),
                 lambda: comm.all_reduce_dict({"n": 1}, group=None), lambda: comm.barrier(group=None),
                 lambda: comm.all_gather_object(rank, group=None), lambda: comm.group_ranks(group=None),
                 lambda: comm.broadcast_object(rank, group=None), lambda: comm.describe(group=None)):
        try:
            call()
            out["none_refused"].append(None)
        except ValueError as err:
            out["none_refused"].append(str(err))
    # After every case the ranks are still in step: one more collective matches.
    out["in_step"] = comm.all_reduce_sum(torch.tensor([1.0]), group=comm.world_group()).item()
    return out, missing


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    results = run_on_ranks(_exercise, 2, str(tmp_path_factory.mktemp("comm")))
    return [r[0] for r in results], results[0][1]


@pytest.mark.gloo
def test_identity_on_two_ranks(ranks):
    r0, r1 = ranks[0]
    assert r0["identity"] == (True, 0, 2, 0, True, 2, 0)
    assert r1["identity"] == (True, 1, 2, 1, False, 2, 1)


@pytest.mark.gloo
def test_all_reduce_sum_and_dict(ranks):
    for r in ranks[0]:
        assert r["sum_in_place"]
        assert r["sum"] == [11.0, 1.5]  # [1 + 10, 2 - 0.5]
        assert r["sum_int"] == [9, 12]  # [3 + 6, 4 + 8]
        assert r["sum_world_named"] == [3.0]  # 1 + 2
        # loss 1.5 + 0.25, rows 4 + 3, tokens 2**30 + 1 (exact in float64 only)
        assert r["dict"] == {"loss": 1.75, "rows": 7.0, "tokens": 1073741825.0}
        assert list(r["dict"]) == ["loss", "rows", "tokens"]
        assert r["in_step"] == 2.0


@pytest.mark.gloo
def test_group_none_is_refused_inside_a_process_group(ranks):
    """None means the world to torch.distributed; comm wants the world named (world_group())."""
    want = "comm: group=None inside a process group; pass the group meant (comm.world_group() for every rank)"
    for r in ranks[0]:
        assert r["none_refused"] == [want] * 7


@pytest.mark.gloo
def test_broadcast_object_and_barrier(ranks):
    r0, r1 = ranks[0]
    for r in (r0, r1):
        assert r["bcast_0"] == {"seed": 17, "files": ["a.jsonl", "b.jsonl"]}
        assert r["bcast_1"] == ("from", 1)
    assert r0["barrier_waited"]


@pytest.mark.gloo
def test_explicit_group_reaches_the_collective(ranks):
    r0, r1 = ranks[0]
    assert r0["pair"] == (2, 0, [3.0], "rank1")
    assert r1["pair"] == (2, 1, [3.0], "rank1")
    # Over a rank's own group a sum is its own value (the world sum would be 5 + 10 = 15).
    assert r0["own"] == (1, 0, [5.0], {"n": 1.0}, "rank0")
    assert r1["own"] == (1, 0, [10.0], {"n": 2.0}, "rank1")
    # Rank 1's failure inside its own group stays there.
    assert r0["own_fail"] is None
    assert r1["own_fail"] == (BAD_ROW, True, "DataError")


@pytest.mark.gloo
def test_fail_together_every_rank_raises_the_first_message(ranks):
    (r0, r1), missing = ranks
    f0, f1 = r0["fail"], r1["fail"]
    assert f0["none"] is None and f1["none"] is None
    # The failing rank raises its own line; the others name the rank it came from.
    # Every rank raises the class the failing rank raised (rank 0 here raised nothing itself).
    assert f0["rank1"] == (f"rank 1: {BAD_ROW}", True, "DataError")
    assert f1["rank1"] == (BAD_ROW, True, "DataError")
    assert f0["pair_rank1"] == f0["rank1"] and f1["pair_rank1"] == f1["rank1"]
    # Rank 0's message is the one rank 0 prints, so it carries no prefix anywhere.
    assert f0["rank0"] == f1["rank0"] == (BAD_KEY, True, "ConfigError")
    # Several failures: the lowest rank's message and class win on every rank.
    assert f0["both"] == f1["both"] == (BAD_KEY, True, "ConfigError")
    oserror = f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"
    assert f0["oserror"] == f"rank 1: {oserror}" and f1["oserror"] == oserror
    assert f0["bug"] == ("rank 1: unexpected ValueError: bug (traceback on that rank)", True)
    assert f1["bug"] == ("ValueError", "bug", False)


def _exercise_pair_of_three(rank):
    """World of 3; ``pair`` = ranks 0, 1 and ``tail`` = ranks 1, 2. Only members call a group's
    collectives; every rank creates both groups, in the same order."""
    pair, tail = dist.new_group([0, 1]), dist.new_group([1, 2])
    out = {}
    if rank in (0, 1):
        out["pair"] = (comm.group_size(group=pair), comm.group_rank(group=pair),
                       comm.all_reduce_sum(torch.tensor([rank + 1.0]), group=pair).tolist(),
                       comm.all_reduce_dict({"n": 10 * (rank + 1)}, group=pair),
                       comm.broadcast_object(f"from rank {rank}", src=1, group=pair))
        comm.barrier(group=pair)
        out["pair_fail"] = _fail_case(rank, [None, DataError(BAD_ROW)], pair)
    if rank in (1, 2):
        # src is the global rank; the group rank of global rank 2 in ``tail`` is 1.
        out["tail"] = (comm.group_rank(group=tail), comm.broadcast_object(f"from rank {rank}", src=2, group=tail))
    out["world"] = comm.all_reduce_sum(torch.tensor([rank + 1.0]), group=comm.world_group()).tolist()
    return out


@pytest.mark.gloo
def test_a_group_that_leaves_a_rank_out():
    r0, r1, r2 = run_on_ranks(_exercise_pair_of_three, 3)
    # Over ranks 0 and 1: 1 + 2 = 3 and 10 + 20 = 30 (the world would give 6 and 60).
    assert r0["pair"] == (2, 0, [3.0], {"n": 30.0}, "from rank 1")
    assert r1["pair"] == (2, 1, [3.0], {"n": 30.0}, "from rank 1")
    assert r0["pair_fail"] == (f"rank 1: {BAD_ROW}", True, "DataError") and r1["pair_fail"] == (BAD_ROW, True, "DataError")
    assert "pair" not in r2
    assert r1["tail"] == (0, "from rank 2") and r2["tail"] == (1, "from rank 2")
    assert r0["world"] == r1["world"] == r2["world"] == [6.0]


_RUN_RANK = """
import atexit, os, sys
import torch.distributed as dist
from megakto.distributed import comm
atexit.register(print, "interpreter teardown", flush=True)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
destroy = dist.destroy_process_group
def traced_destroy():
    print("group destroyed", flush=True)
    destroy()
dist.destroy_process_group = traced_destroy
def main():
    print("group up:", comm.is_initialized(), flush=True)
    {body}
comm.run_rank(main)
print("not reached")
"""


@pytest.mark.gloo
@pytest.mark.parametrize("body, status, stderr, destroyed", [
    ("return None", 0, "", True),
    ("return 3", 3, "", False),  # main's own status; a rank's own decision: no teardown
    # The traceback, as the interpreter prints it, then the one line.
    ("raise ValueError('boom')", 1, "ValueError: boom\nmegakto: error: rank 0: unexpected ValueError: boom", False),
    ("raise SystemExit('train.jsonl: row 3: bad')", 1, "train.jsonl: row 3: bad", False),
    # A user error this rank found alone: its line, no traceback, no teardown.
    ("from megakto.errors import DataError; raise DataError('train.jsonl: row 3: bad')", 1,
     "megakto: error: train.jsonl: row 3: bad", False),
    # Raised on every rank by fail_together: the ranks end together, the group is torn down.
    ("from megakto.errors import DataError\n    with comm.fail_together(group=comm.world_group()):\n        raise DataError('row 3')", 1,
     "DataError: row 3", True),
])
def test_run_rank_exits_with_mains_status_and_no_teardown(body, status, stderr, destroyed):
    proc = subprocess.run([sys.executable, "-c", _RUN_RANK.replace("{body}", body), str(free_port())], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == status, proc.stderr[-2000:]
    # Nothing after run_rank runs, the interpreter's teardown (atexit) included. The process group is
    # destroyed only on the exits every rank takes together.
    assert proc.stdout.splitlines() == ["group up: True"] + ["group destroyed"] * destroyed
    assert stderr in proc.stderr and "terminate called" not in proc.stderr
    assert ("Traceback" in proc.stderr) == ("ValueError" in body or "fail_together" in body)


# ----------------------------------------------------------------------------- exits and long phases

GLOO_PEER_GONE = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:2972. This is typically caused by a remote worker crashing.")


def test_report_failure_names_the_rank_and_tells_a_lost_peer_from_a_bug(no_launcher_env, capsys):
    no_launcher_env.setenv("RANK", "3")
    comm.report_failure(RuntimeError(GLOO_PEER_GONE))
    assert capsys.readouterr().err == (f"megakto: rank 3: stopped: a collective failed (RuntimeError: {GLOO_PEER_GONE}); "
                                       "another rank most likely failed first: read its error line\n")
    comm.report_failure(DataError(BAD_ROW))
    assert capsys.readouterr().err == f"megakto: error: rank 3: {BAD_ROW}\n"
    try:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    except RuntimeError as err:
        comm.report_failure(err)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "megakto: error: rank 3: unexpected RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB " \
                        "(traceback above)"
    assert comm.collective_failed(dist.DistBackendError("NCCL watchdog timeout"))
    assert not comm.collective_failed(ValueError("Connection closed by peer"))  # only the runtime's errors


def test_others_wait_logs_the_wait_the_duration_and_a_timeout_warning(no_launcher_env):
    lines = []
    with comm.others_wait("rank 0 converts the checkpoint", lines.append, timeout=10):
        pass
    assert lines == []  # one rank: nobody waits, nothing to say
    no_launcher_env.setenv("WORLD_SIZE", "2")
    with comm.others_wait("rank 0 converts the checkpoint", lines.append, timeout=10):
        pass
    assert lines[0] == "rank 0 converts the checkpoint; the other ranks wait for it (dist.timeout_minutes=10)"
    assert lines[1].startswith("rank 0 converts the checkpoint: done in 0.") and len(lines) == 2
    lines.clear()
    # 0.0002 min = 12 ms; 20 ms is past 80 % of it.
    with comm.others_wait("local rank 0 tokenizes", lines.append, timeout=0.0002):
        time.sleep(0.02)
    assert len(lines) == 3 and lines[2].startswith("warning: local rank 0 tokenizes took 0 s, ")
    assert lines[2].endswith(" of dist.timeout_minutes=0.0002 (0 s): a little more and the waiting ranks time out; "
                             "raise dist.timeout_minutes")
    share = int(lines[2].split(", ")[1].split("%")[0])
    assert share >= 80
