"""Run one function on N CPU processes over a real gloo group and bring back what each rank returns.

``run_on_ranks(fn, nproc, *args)`` spawns ``nproc`` fresh interpreters (``fn`` must be a module-level
function), joins them into one gloo group through a ``file://`` store, calls ``fn(rank, *args)`` on
each and returns the results in rank order. A rank that raises fails the call with that rank's
traceback; a group that has not finished after ``timeout`` seconds is killed, so a collective that
never matches fails the test instead of hanging it. RANK, WORLD_SIZE and LOCAL_RANK are set as the
launcher sets them.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn, nproc: int, scratch: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(scratch, 'store')}",
                            rank=rank, world_size=nproc)
    try:
        result = fn(rank, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(scratch, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    # Leave without the interpreter's teardown, as every megakto rank does (comm.exit_process): a
    # gloo thread still alive in static state can abort it (SIGABRT, 'terminate called without an
    # active exception') after the result is written, seen here in about one run in five.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn, nproc: int, *args, timeout: float = 120.0) -> list:
    with tempfile.TemporaryDirectory(prefix="megakto-gloo-") as scratch:
        context = mp.start_processes(_entry, args=(fn, nproc, scratch, args), nprocs=nproc, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                    p.join()
                raise TimeoutError(f"{fn.__name__} on {nproc} gloo ranks did not finish in {timeout:.0f} s")
        results = []
        for rank in range(nproc):
            with open(os.path.join(scratch, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
