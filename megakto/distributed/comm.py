"""The one module that talks to ``torch.distributed``.

Every function that takes a group takes it as a required keyword, the world included
(``group=world_group()``): a call site says which ranks it means, and no reader has to know a
default. Inside a process group, ``group=None`` (torch's spelling of the world) is refused at run
time, so a group that was never set (a None default, a degree-1 group) cannot silently reduce over
every rank. Collectives return early when there is nothing to reduce (no process group, or a group of
size 1), so the same trainer code runs in a single process and under the launcher. Metrics and the KL
reference point are reduced as (sum, count) pairs in one flat float64 tensor: one collective per
call, exact global means.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Callable, Iterator, Mapping, NoReturn, Optional, TypeAlias

import torch
import torch.distributed as dist

from megakto.errors import MegaktoError

__all__ = [
    "ProcessGroup",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "world_group",
    "group_size",
    "group_rank",
    "group_ranks",
    "all_reduce_sum",
    "all_reduce_max",
    "all_reduce_dict",
    "any_rank",
    "barrier",
    "broadcast_object",
    "broadcast_tensor",
    "all_gather_object",
    "fail_together",
    "timeout_minutes",
    "describe",
    "others_wait",
    "collective_failed",
    "report_failure",
    "shutdown",
    "abort",
    "exit_process",
    "run_rank",
]

# A group as torch.distributed hands it out. None only outside a process group, where world_group()
# returns it and every collective is a no-op; inside one, every group is a real object (_named).
ProcessGroup: TypeAlias = Optional[dist.ProcessGroup]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def world_group() -> ProcessGroup:
    """Every rank (for the few reductions that span all of them, e.g. peak memory): named, so a
    call site says it means the world rather than forgetting its data-parallel group."""
    return dist.group.WORLD if is_initialized() else None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def _named(group: ProcessGroup) -> ProcessGroup:
    """``group``, refused when it is None inside a process group: torch reads None as the world, and
    a call site that means the world says so (:func:`world_group`)."""
    if group is None and is_initialized():
        raise ValueError("comm: group=None inside a process group; pass the group meant "
                         "(comm.world_group() for every rank)")
    return group


def group_size(*, group: ProcessGroup) -> int:
    return dist.get_world_size(_named(group)) if is_initialized() else 1


def group_rank(*, group: ProcessGroup) -> int:
    return dist.get_rank(_named(group)) if is_initialized() else 0


def group_ranks(*, group: ProcessGroup) -> list[int]:
    """Global ranks of ``group``'s members, in group-rank order."""
    if not is_initialized():
        return [0]
    return list(dist.get_process_group_ranks(_named(group)))


def _comm_device(group: ProcessGroup) -> torch.device:
    """NCCL reduces only GPU tensors; gloo only CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op, group: ProcessGroup) -> torch.Tensor:
    if group_size(group=group) > 1:
        device = _comm_device(group)
        if tensor.device == device:
            dist.all_reduce(tensor, op=op, group=group)
        else:
            moved = tensor.to(device)
            dist.all_reduce(moved, op=op, group=group)
            tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, *, group: ProcessGroup) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group``; a no-op outside a process group of size > 1.
    A tensor on a device the backend cannot reduce travels to one that it can and back."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max(tensor: torch.Tensor, *, group: ProcessGroup) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ``group``, in place (as :func:`all_reduce_sum`)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, group)


def broadcast_object(obj, src: int = 0, *, group: ProcessGroup):
    """Rank ``src``'s ``obj`` on every rank (one decision, so ranks cannot disagree)."""
    if group_size(group=group) == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def broadcast_tensor(tensor: torch.Tensor, src: int, *, group: ProcessGroup) -> torch.Tensor:
    """Global rank ``src``'s ``tensor`` into ``tensor`` on every rank of ``group``, in place."""
    if group_size(group=group) > 1:
        device = _comm_device(group)
        moved = tensor if tensor.device == device else tensor.to(device)
        dist.broadcast(moved, src=src, group=group)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def all_gather_object(obj, *, group: ProcessGroup) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank of ``group``."""
    if group_size(group=group) == 1:
        return [obj]
    gathered = [None] * group_size(group=group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def all_reduce_dict(values: Mapping[str, float | torch.Tensor], *, group: ProcessGroup) -> dict[str, float]:
    """Sum a dict of scalars over ``group`` with a single collective.

    Every rank must pass the same keys; they are sorted so insertion order cannot misalign them
    (a failure seen in peers that reduce metric lists by position).
    """
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    all_reduce_sum(flat, group=group)
    return dict(zip(keys, flat.tolist()))


def any_rank(flag: bool, *, group: ProcessGroup) -> bool:
    """True on every rank of ``group`` if ``flag`` is true on any of them (one decision for all)."""
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return bool(all_reduce_sum(t, group=group)[0] > 0)


def barrier(*, group: ProcessGroup) -> None:
    if group_size(group=group) > 1:
        dist.barrier(group=group)


@contextlib.contextmanager
def fail_together(*, group: ProcessGroup) -> Iterator[None]:
    """Run a block of user-input checks so that all ranks fail, or none does.

    A rank whose block raises :class:`MegaktoError` (or ``OSError``) shares its one-line message;
    every rank then raises the first message, as the class it was raised as (``DataError``,
    ``ConfigError``, ...; an ``OSError`` as ``MegaktoError``) and marked ``shared`` (rank 0 prints
    it once), so all exit non-zero and none waits forever in a later collective. Any other exception is a bug, not
    bad input: the rank that hit it re-raises it (its traceback is the report) and the others
    raise a one-line error naming it. Messages name global ranks. Outside a process group this is
    a plain block.
    """
    message, unexpected, kind = None, None, MegaktoError
    try:
        yield
    except MegaktoError as err:
        message, kind = str(err), type(err)
    except OSError as err:
        message = f"{err.__class__.__name__}: {err}"
    except Exception as err:  # a bug, not bad input: this rank keeps its traceback, the others stop
        message, unexpected = f"unexpected {err.__class__.__name__}: {err} (traceback on that rank)", err
    if group_size(group=group) > 1:
        messages = [None] * group_size(group=group)
        dist.all_gather_object(messages, None if message is None else (kind, message), group=group)
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if unexpected is not None:
            raise unexpected
        if failed:
            r, (kind, m) = failed[0]
            r = dist.get_global_rank(group, r)
            raise _shared(kind(m if r == 0 or message == m else f"rank {r}: {m}"))
    elif unexpected is not None:
        raise unexpected
    elif message is not None:
        raise _shared(kind(message))


def _shared(err: MegaktoError) -> MegaktoError:
    err.shared = True
    return err


def timeout_minutes(*, group: ProcessGroup) -> float | None:
    """The collective timeout ``group``'s backend enforces (its watchdog under NCCL), in minutes: what
    a rank waiting in a collective waits at most. None outside a process group, or where the backend
    does not expose it."""
    if not is_initialized():
        return None
    _named(group)
    try:
        backend = group._get_backend(_comm_device(group))
        return backend.options._timeout.total_seconds() / 60
    except Exception:  # a private surface: absent on some backends or releases; this is only a diagnostic
        return None


def describe(*, group: ProcessGroup) -> str:
    """``gloo, 2 ranks, collective timeout 10 min``: the process group a run works in."""
    if not is_initialized():
        return "no process group (one process)"
    _named(group)
    minutes = timeout_minutes(group=group)
    limit = f"{minutes:g} min" if minutes is not None else "not exposed by the backend"
    return f"{dist.get_backend(group)}, {group_size(group=group)} ranks, collective timeout {limit}"


# A phase that some ranks run while the others wait in a collective warns past this share of the timeout.
_TIMEOUT_WARN_SHARE = 0.8


@contextlib.contextmanager
def others_wait(what: str, log: Callable[[str], None], *, timeout: float | None = None,
                key: str = "dist.timeout_minutes") -> Iterator[None]:
    """Log a long phase that one rank (or one per node) runs while the others wait for it in a
    collective: before it, that they wait and for how long at most; after it, how long it took, and a
    warning naming ``key`` when that came within 20 % of the timeout. Under NCCL the waiting ranks'
    watchdog kills them at the timeout without a Python error, so this line is what tells why.
    ``timeout`` (minutes): the run's setting; None reads it from the process group. Silent with a
    single rank (nobody waits); the phase runs either way."""
    if world_size() == 1:
        yield
        return
    minutes = timeout if timeout is not None else timeout_minutes(group=world_group())
    limit = f"{key}={minutes:g}" if minutes is not None else "the process group's timeout"
    log(f"{what}; the other ranks wait for it ({limit})")
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    log(f"{what}: done in {seconds:.1f} s")
    if minutes is not None and seconds > _TIMEOUT_WARN_SHARE * minutes * 60:
        log(f"warning: {what} took {seconds:.0f} s, {seconds / (minutes * 60):.0%} of {key}={minutes:g} "
            f"({minutes * 60:.0f} s): a little more and the waiting ranks time out; raise {key}")


# What a rank sees when a peer it waits for in a collective is gone (gloo: the peer's sockets closed;
# NCCL: the communicator aborted or a remote rank exited; the store: its host, rank 0, exited).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "communicator was aborted", "NCCL communicator")


def collective_failed(err: BaseException) -> bool:
    """True when ``err`` says a collective or the rendezvous store failed, typically because another
    rank left first: that rank's error is the one to read, not this one."""
    if isinstance(err, (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_GONE)


def report_failure(err: BaseException) -> None:
    """Print why this rank stops after an exception it did not share with the others (not a
    ``fail_together`` error), naming the rank: a :class:`MegaktoError` as its one line; a collective
    that failed under it as one line that is not an error line (another rank left first, and that
    rank's line is the one to read); anything else as its traceback and one ``megakto: error`` line."""
    r = rank()
    first = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, MegaktoError):  # a user error this rank found alone: its one line is the report
        print(f"megakto: error: {'' if r == 0 else f'rank {r}: '}{first}", file=sys.stderr, flush=True)
        return
    if collective_failed(err):
        print(f"megakto: rank {r}: stopped: a collective failed ({err.__class__.__name__}: {first}); another "
              "rank most likely failed first: read its error line", file=sys.stderr, flush=True)
        return
    traceback.print_exception(err)
    print(f"megakto: error: rank {r}: unexpected {err.__class__.__name__}: {first} (traceback above)",
          file=sys.stderr, flush=True)


def shutdown() -> None:
    """Destroy the process group, if any, without a collective: for an exit every rank takes together
    (status 0, or an error raised on every rank by :func:`fail_together`). Exiting with the group alive
    lets the gloo/NCCL threads be destroyed mid-flight at interpreter exit (``terminate called without
    an active exception``, exit 250 instead of 1); :func:`abort` avoids that by never reaching it."""
    if is_initialized():
        dist.destroy_process_group()


def abort(status: int = 1) -> NoReturn:
    """Leave at once with ``status`` (never 0), the process group left as it is: the exit of a rank that
    failed alone while its peers may sit in a collective. Since torch 2.6 ``destroy_process_group``
    flushes pending NCCL work (pytorch PR 141510), so a graceful teardown here could block until the
    peers' watchdog fires, ``dist.timeout_minutes`` later. Leaving closes this rank's connections, and
    the deepspeed launcher then ends every sibling on the node (it terminates them all as soon as one
    exits non-zero, deepspeed/launcher/launch.py). Skipping the interpreter's teardown (``os._exit``)
    also skips the C++ destructors that abort with ``terminate called`` on a live group."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 1)


def exit_process(status: int, *, together: bool = True) -> NoReturn:
    """End this rank and leave without the interpreter's teardown. ``together``: every rank ends
    alike (status 0, or a :func:`fail_together` error), so the process group is destroyed first;
    otherwise :func:`abort`. A C++ thread still alive in a library's static state (gloo, a tokenizer
    or datasets pool) can abort at interpreter exit (``terminate called without an active
    exception``), turning a finished run's exit status 0 or 1 into 250; everything megakto writes is
    closed and flushed by then."""
    if not together and status:
        abort(status)
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_rank(main: Callable[[], object]) -> NoReturn:
    """Run a rank's entry point, then end the rank: with the status ``main`` returns (an int; 0 for
    anything else); a ``SystemExit``'s own status (its message printed, as the interpreter would); 1
    after the traceback and one ``megakto: error`` line (:func:`report_failure`) of any other
    exception that escaped ``main``. The process group is torn down only when the ranks end together
    (status 0, or a :func:`fail_together` error, which every rank raises); any other failure leaves
    at once (:func:`abort`), so peers waiting in a collective are ended by the launcher instead of
    hanging until the timeout."""
    shared = False
    try:
        returned = main()
        status = returned if isinstance(returned, int) else 0
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            status = err.code or 0
        else:  # a message: printed, status 1
            print(err.code, file=sys.stderr)
            status = 1
    except MegaktoError as err:
        shared = getattr(err, "shared", False)
        if shared:  # every rank raises it: the traceback, as before, then a graceful exit
            traceback.print_exc()
        else:
            report_failure(err)
        status = 1
    except BaseException as err:
        report_failure(err)
        status = 1
    exit_process(status, together=status == 0 or shared)
