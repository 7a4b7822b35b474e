"""Per-rank peak memory of a run, measured the way the memory planner predicts it.

* On a GPU: ``torch.cuda.max_memory_allocated`` (what tensors held at the peak) and
  ``max_memory_reserved`` (what the caching allocator had taken from the driver), since the peak
  counters were reset just before the engines were built.
* On CPU: the peak resident set (the kernel's VmHWM) beyond the resident set just before the
  engines were built: live bytes plus the freed blocks glibc keeps in its heap (reported beside
  it, :func:`heap_figures`; ``MALLOC_MMAP_THRESHOLD_`` lowers them). The kernel's counter is
  reset at that point (``/proc/self/clear_refs``), so tokenization and library imports before it do not count; where the reset is refused the counter
  runs from process start, which can only over-state the peak (``hwm_reset`` says which).

:func:`reduce_peaks` turns each rank's figure into the run's (max and min over ranks) with one
all-reduce; the trainer logs it as ``memory/peak_gib`` and ``memory/peak_gib_min``, and on CPU
``memory/retained_gib``: the most freed heap glibc keeps on any rank at that step.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from megakto.distributed import comm

__all__ = ["PeakMemory", "RunPeak", "reduce_peaks", "GIB", "heap_figures", "glibc_heap", "HISTORY_ENV"]

GIB = 1024 ** 3


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc_heap(info) -> dict[str, int]:
    """glibc's ``mallinfo2`` (summed over its arenas) as bytes: ``heap_used`` (allocated blocks in
    the arenas), ``heap_free`` (freed blocks the arenas keep: resident until reused or trimmed, the
    retained memory that RSS counts and torch no longer does) and ``mmapped`` (blocks above the
    mmap threshold, each returned to the OS when freed). Pure: ``info`` is any object with the
    struct's fields."""
    return {"heap_used": int(info.uordblks), "heap_free": int(info.fordblks), "mmapped": int(info.hblkhd)}


def heap_figures() -> dict[str, int]:
    """This process's resident set (``rss``) and :func:`glibc_heap` now; the glibc figures are 0
    where there is no ``mallinfo2`` (not glibc, or glibc before 2.33)."""
    out = {"rss": _status_bytes("VmRSS"), "heap_used": 0, "heap_free": 0, "mmapped": 0}
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return out
    mallinfo2.restype = _Mallinfo2
    return {**out, **glibc_heap(mallinfo2())}


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


HISTORY_ENV = "MEGAKTO_CUDA_MEMORY_HISTORY"
HISTORY_ENTRIES = 1_000_000  # the recording's ring buffer: a longer run keeps its last events only


class PeakMemory:
    """Start the measurement now (call just before the engines are built); :meth:`peak` later.

    On a GPU with ``MEGAKTO_CUDA_MEMORY_HISTORY=DIR`` set, every allocation from here on is recorded
    with its stack (``torch.cuda.memory._record_memory_history``) and :meth:`dump_history` writes
    ``DIR/rank{r}.pickle`` at the run's end (``DIR/rank{r}-oom.pickle`` at an out-of-memory error), for
    ``tools/cuda_memory_peak.py`` (what is live at the peak, by the code that allocated it) or PyTorch's
    memory viz. It slows allocations and keeps the last 1M events only: a diagnostic for a few steps,
    not for timed runs. On CPU ``tools/memory_timeline.py --rss`` gives the phases' peaks instead."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.history_dir = os.environ.get(HISTORY_ENV) or None
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
            self.baseline = 0
            self.hwm_reset = True
            if self.history_dir:
                torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES, stacks="python")
                self._dump_on_out_of_memory()
        else:
            self.hwm_reset = _reset_hwm()
            self.baseline = _status_bytes("VmRSS")

    def _dump_on_out_of_memory(self) -> None:
        """An out-of-memory error, the run a history is most wanted for, writes ``rank{r}-oom.pickle``
        before it raises (torch's out-of-memory observer; ``RANK`` from the launcher)."""
        def observer(device, alloc, device_alloc, device_free):
            os.makedirs(self.history_dir, exist_ok=True)
            torch.cuda.memory._dump_snapshot(os.path.join(self.history_dir, f"rank{os.environ.get('RANK', '0')}-oom.pickle"))

        attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is not None:
            attach(observer)

    def dump_history(self, rank: int) -> str | None:
        """Write the recorded allocations (GPU, ``MEGAKTO_CUDA_MEMORY_HISTORY`` set) and stop recording;
        the file's path, or None where nothing was recorded."""
        if not (self.on_gpu and self.history_dir):
            return None
        os.makedirs(self.history_dir, exist_ok=True)
        path = os.path.join(self.history_dir, f"rank{rank}.pickle")
        torch.cuda.memory._dump_snapshot(path)
        torch.cuda.memory._record_memory_history(enabled=None)
        return path

    def peak(self) -> tuple[int, int]:
        """(peak bytes, peak reserved bytes) of this rank since the start; on CPU both are the
        peak RSS beyond the baseline."""
        if self.on_gpu:
            return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())
        beyond = max(0, _status_bytes("VmHWM") - self.baseline)
        return beyond, beyond


@dataclass(frozen=True)
class RunPeak:
    """The run's peak over ranks, in bytes."""

    max_bytes: int
    min_bytes: int
    max_reserved_bytes: int
    max_retained_bytes: int = 0  # CPU: glibc's free heap now (heap_figures' heap_free), max over ranks

    def metrics(self, on_gpu: bool) -> dict[str, float]:
        out = {"memory/peak_gib": self.max_bytes / GIB, "memory/peak_gib_min": self.min_bytes / GIB}
        if on_gpu:
            out["memory/peak_reserved_gib"] = self.max_reserved_bytes / GIB
        else:
            out["memory/retained_gib"] = self.max_retained_bytes / GIB
        return out

    def describe(self, on_gpu: bool) -> str:
        what = ("torch.cuda.max_memory_allocated" if on_gpu
                else "peak RSS beyond the RSS just before the engines were built")
        text = (f"peak memory {self.max_bytes / GIB:.3f} GiB on the fullest rank, {self.min_bytes / GIB:.3f} GiB "
                f"on the emptiest ({what})")
        if on_gpu:
            text += f"; reserved {self.max_reserved_bytes / GIB:.3f} GiB"
        else:  # the resident set counts freed blocks glibc keeps; the memory plan predicts live bytes
            text += (f"; glibc now keeps {self.max_retained_bytes / GIB:.3f} GiB of freed heap on the rank keeping the "
                     "most (counted in RSS, not live)")
        return text


def reduce_peaks(peak: PeakMemory, *, group: comm.ProcessGroup) -> RunPeak:
    """Max and min over ``group`` (the trainer passes every rank: ``comm.world_group()``) of every
    rank's peak, and on CPU the most glibc retains now: one all-reduce of (peak, -peak, reserved,
    retained) under MAX. Collective: every rank of the group calls it."""
    used, reserved = peak.peak()
    retained = 0 if peak.on_gpu else heap_figures()["heap_free"]
    values = torch.tensor([used, -used, reserved, retained], dtype=torch.float64)
    comm.all_reduce_max(values, group=group)
    return RunPeak(int(values[0]), int(-values[1]), int(values[2]), int(values[3]))
