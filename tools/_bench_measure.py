"""What tools/bench.py measures inside each worker, and the machine it ran on: peak resident memory
(the kernel's VmHWM, or a sampling thread), step-end times with target tokens and rows, CPU time,
and on a GPU its peak memory. tools/bench_data.py and tools/quality_bench.py use these too."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import threading
import time

__all__ = ["MIB", "PeakRss", "StepClock", "machine_info", "read_status"]

MIB = 1 << 20


def read_status(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the
    RSS taken after the warmup steps is the live state (weights, optimizer states, whatever the
    trainer keeps between steps) and not the allocator's cache of freed activations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak resident memory since the last :meth:`mark`.

    The kernel's own peak (VmHWM, reset through /proc/self/clear_refs) is exact and costs nothing.
    A sampling thread is the fallback where the reset is not allowed, or on request: on a 2-core
    machine a thread waking every 5 ms next to 2 torch threads slowed TRL's step 2.3x (78 s against
    33 s for 3 steps), so it is off by default and its use is recorded with the figures.
    """

    def __init__(self, interval: float = 0.0):
        self.hwm = _reset_hwm()
        self.interval = interval if interval > 0 or self.hwm else 0.005
        self.sampled = 0
        self._stop = threading.Event()
        self._thread = None
        if self.interval > 0:
            self.sampled = read_status("VmRSS")
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, read_status("VmRSS"))

    def mark(self) -> int:
        """Current RSS, which also becomes the peak (the next window starts here)."""
        if self.hwm:
            _reset_hwm()
        now = read_status("VmRSS")
        self.sampled = now
        return now

    def peak(self) -> dict:
        """Peak since the last mark, in bytes, by each method in use; stops the sampler."""
        out = {}
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            out["sampled"] = max(self.sampled, read_status("VmRSS"))
        if self.hwm:
            out["vmhwm"] = read_status("VmHWM")
        return out

    def describe(self) -> str:
        parts = ["VmHWM reset after setup"] if self.hwm else []
        if self._thread is not None:
            parts.append(f"VmRSS sampled every {self.interval * 1000:g} ms")
        return " + ".join(parts)


class StepClock:
    """Step-end times and per-step target tokens/rows; the timed window starts after ``warmup``."""

    def __init__(self, warmup: int, rss: PeakRss):
        self.warmup, self.rss = warmup, rss
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.rows: list[int] = []
        self.cpu: list[float] = []
        self.warm_rss = 0

    def step_done(self, tokens: int, rows: int) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(_cpu_seconds())
        self.tokens.append(int(tokens))
        self.rows.append(int(rows))
        if len(self.ends) == self.warmup:
            _release_free_memory()
            self.warm_rss = self.rss.mark()

    def summary(self, setup_rss: int) -> dict:
        w = self.warmup
        peaks = self.rss.peak()
        peak = peaks.get("vmhwm", peaks.get("sampled"))
        timed = self.ends[-1] - self.ends[w - 1]
        cpu = self.cpu[-1] - self.cpu[w - 1]
        tokens, rows = sum(self.tokens[w:]), sum(self.rows[w:])
        out = {
            "timed_steps": len(self.ends) - w, "timed_s": timed, "target_tokens": tokens, "rows": rows,
            "tokens_per_s": tokens / timed, "samples_per_s": rows / timed,
            "seconds_per_step": timed / (len(self.ends) - w), "cpu_s_per_step": cpu / (len(self.ends) - w),
            "step_s": [b - a for a, b in zip(self.ends[:-1], self.ends[1:])][w - 1:],
            "tokens_per_step": self.tokens[w:],
            "setup_rss_mib": setup_rss / MIB, "warm_rss_mib": self.warm_rss / MIB, "peak_rss_mib": peak / MIB,
            "peak_beyond_setup_mib": (peak - setup_rss) / MIB,
            # Beyond weights and optimizer states: the peak over the RSS that persists between steps.
            "peak_beyond_warm_mib": (peak - self.warm_rss) / MIB, "memory_method": self.rss.describe(),
        }
        if "sampled" in peaks:
            out["sampled_peak_beyond_setup_mib"] = (peaks["sampled"] - setup_rss) / MIB
        return {**out, **_device_figures()}


def _device_figures() -> dict:
    """Where the worker computed, and on a GPU its peak memory since the worker started (what
    tensors held, and what the caching allocator took from the driver)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {"device": "cpu"}
    return {"device": f"cuda: {torch.cuda.get_device_name()}",
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / MIB,
            "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved() / MIB}


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads. Less sensitive than wall time to other
    jobs on the machine (though not immune: shared caches, and spinning threads waiting for a peer)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_info(threads: int, device: str = "cpu") -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "trl", "deepspeed", "datasets", "accelerate"):
        try:
            from importlib.metadata import version
            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads": threads, "device": device, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}
