"""The one module that talks to ``torch.distributed``.

Every collective takes an explicit group (``None`` is the default world group) and returns early
when there is nothing to reduce (no process group, or a group of size 1), so the same trainer code
runs in a single process and under the launcher. Metrics and the KL reference point are reduced as
(sum, count) pairs in one flat float64 tensor: one collective per call, exact global means.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Callable, Iterator, Mapping, NoReturn

import torch
import torch.distributed as dist

from megakto.errors import MegaktoError

__all__ = [
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
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
    "shutdown",
    "exit_process",
    "run_rank",
]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def world_group():
    """Every rank (for the few reductions that span all of them, e.g. peak memory): named, so a
    call site says it means the world rather than forgetting its data-parallel group."""
    return dist.group.WORLD if is_initialized() else None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def group_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def group_rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def group_ranks(group=None) -> list[int]:
    """Global ranks of ``group``'s members, in group-rank order."""
    if not is_initialized():
        return [0]
    return list(dist.get_process_group_ranks(group or dist.group.WORLD))


def _comm_device(group) -> torch.device:
    """NCCL reduces only GPU tensors; gloo only CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group_size(group) > 1:
        device = _comm_device(group)
        if tensor.device == device:
            dist.all_reduce(tensor, op=op, group=group)
        else:
            moved = tensor.to(device)
            dist.all_reduce(moved, op=op, group=group)
            tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group``; a no-op outside a process group of size > 1.
    A tensor on a device the backend cannot reduce travels to one that it can and back."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ``group``, in place (as :func:`all_reduce_sum`)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, group)


def broadcast_object(obj, src: int = 0, group=None):
    """Rank ``src``'s ``obj`` on every rank (one decision, so ranks cannot disagree)."""
    if group_size(group) == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def broadcast_tensor(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Global rank ``src``'s ``tensor`` into ``tensor`` on every rank of ``group``, in place."""
    if group_size(group) > 1:
        device = _comm_device(group)
        moved = tensor if tensor.device == device else tensor.to(device)
        dist.broadcast(moved, src=src, group=group)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank of ``group``."""
    if group_size(group) == 1:
        return [obj]
    gathered = [None] * group_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def all_reduce_dict(values: Mapping[str, float | torch.Tensor], group=None) -> dict[str, float]:
    """Sum a dict of scalars over ``group`` with a single collective.

    Every rank must pass the same keys; they are sorted so insertion order cannot misalign them
    (a failure seen in peers that reduce metric lists by position).
    """
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    all_reduce_sum(flat, group)
    return dict(zip(keys, flat.tolist()))


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank of ``group`` if ``flag`` is true on any of them (one decision for all)."""
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return bool(all_reduce_sum(t, group)[0] > 0)


def barrier(group=None) -> None:
    if group_size(group) > 1:
        dist.barrier(group=group)


@contextlib.contextmanager
def fail_together(group=None) -> Iterator[None]:
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
    if group_size(group) > 1:
        messages = [None] * group_size(group)
        dist.all_gather_object(messages, None if message is None else (kind, message), group=group)
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if unexpected is not None:
            raise unexpected
        if failed:
            r, (kind, m) = failed[0]
            r = dist.get_global_rank(group, r) if group is not None else r
            raise _shared(kind(m if r == 0 or message == m else f"rank {r}: {m}"))
    elif unexpected is not None:
        raise unexpected
    elif message is not None:
        raise _shared(kind(message))


def _shared(err: MegaktoError) -> MegaktoError:
    err.shared = True
    return err


def shutdown() -> None:
    """Destroy the process group, if any, without a collective: safe on an error path where the
    ranks may disagree on what comes next. Exiting with the group alive lets the gloo/NCCL
    threads be destroyed mid-flight at interpreter exit (``terminate called without an active
    exception``, exit 250 instead of 1)."""
    if is_initialized():
        dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End this rank: destroy the process group, flush, and leave without the interpreter's
    teardown. A C++ thread still alive in a library's static state (gloo, a tokenizer or datasets
    pool) can abort there (``terminate called without an active exception``), turning a finished
    run's exit status 0 or 1 into 250; everything megakto writes is closed and flushed by then."""
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_rank(main: Callable[[], object]) -> NoReturn:
    """Run a rank's entry point, then ``exit_process``: the status ``main`` returns (an int; 0
    for anything else); a ``SystemExit``'s own status (its message printed, as the interpreter
    would); 1 after printing the traceback of any other exception that escaped ``main``."""
    try:
        returned = main()
        status = returned if isinstance(returned, int) else 0
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int):
            status = err.code or 0
        else:  # a message: printed, status 1
            print(err.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    exit_process(status)
