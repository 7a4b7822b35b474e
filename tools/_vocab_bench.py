"""What tools/bench_vocab_parallel.py does: build each case and its fp64 reference (in the parent), and
inside each rank run every implementation's forward + backward on its shard of the head and measure it.

* numerics: log-probs, hidden gradient and the rank's weight-gradient rows, each against the fp64
  reference of the same inputs: max and mean absolute difference (sums and counts, so the parent
  combines ranks exactly);
* memory: the peak of bytes allocated by torch's CPU allocator during forward + backward, above
  what was allocated before it (the inputs), from the profiler's allocation events (``profile_memory``:
  every allocation and free, in order; the same count as ``torch.cuda.max_memory_allocated`` minus
  the bytes at the start). The gradients the backward returns (hidden's and the weight's) are part
  of it for every implementation alike;
* time: wall seconds of forward + backward, the fastest of ``repeats`` runs after an untimed first
  one (the numerics run), the ranks lined up by a barrier before each run; the parent reports the
  slowest rank.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["IMPLS", "DTYPES", "make_case", "reference", "measure_rank"]

IMPLS = ("megakto", "ds-fused", "ds-logits")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REF_BLOCK_ELEMENTS = 1 << 23  # fp64 logits elements per chunk of the reference (64 MiB)


def make_case(hidden_size: int, vocab: int, tokens: int, seed: int = 0) -> dict:
    """Hidden states, head weight, targets and signed upstream weights. Hidden and weight are exactly
    representable in bf16 (rounded once here), so the fp32 and bf16 runs score the very same numbers
    and share one reference; the weight's scale gives logits of standard deviation about 4."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(tokens, hidden_size, generator=g).bfloat16().float(),
        "weight": (torch.randn(vocab, hidden_size, generator=g) * (4 / hidden_size ** 0.5)).bfloat16().float(),
        "targets": torch.randint(0, vocab, (tokens,), generator=g),
        "upstream": torch.randn(tokens, generator=g),
    }


def reference(case: dict) -> dict:
    """fp64 log-probs and the gradients of sum(logp * upstream) w.r.t. hidden and weight: full
    log-softmax by autograd, one chunk of tokens at a time, in one process."""
    hidden, targets, upstream = case["hidden"], case["targets"], case["upstream"].double()
    weight = case["weight"].double().requires_grad_()
    n, v = hidden.shape[0], weight.shape[0]
    logps, grad_h = torch.empty(n, dtype=torch.float64), torch.empty(hidden.shape, dtype=torch.float64)
    step = max(1, REF_BLOCK_ELEMENTS // v)
    for s in range(0, n, step):
        h = hidden[s:s + step].double().requires_grad_()
        lp = torch.log_softmax(h @ weight.T, -1).gather(1, targets[s:s + step, None]).squeeze(1)
        (lp * upstream[s:s + step]).sum().backward()
        logps[s:s + step], grad_h[s:s + step] = lp.detach(), h.grad
    return {"logps": logps, "grad_hidden": grad_h, "grad_weight": weight.grad}


def _peak_allocated(run) -> int:
    """Peak bytes allocated by torch on the CPU while ``run()`` runs, above the bytes at its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def _errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got.double() - want).abs()
    return {"max": diff.max().item(), "sum": diff.sum().item(), "count": diff.numel()}


def _measure(fn, hidden: torch.Tensor, weight_rows: torch.Tensor, targets: torch.Tensor, upstream: torch.Tensor,
             ref: dict, rows: slice, repeats: int, barrier) -> dict:
    """Numerics, time and peak memory of ``fn(hidden, weight_rows, targets)``'s forward + backward."""
    h, w = hidden.requires_grad_(), weight_rows.requires_grad_()
    result = {}

    def run():
        h.grad = w.grad = None
        logps = fn(h, w, targets)
        (logps * upstream.to(logps.dtype)).sum().backward()
        result["logps"] = logps.detach()

    barrier()
    run()  # the untimed first run gives the numerics
    figures = {"logps": _errors(result["logps"], ref["logps"]), "grad_hidden": _errors(h.grad, ref["grad_hidden"]),
               "grad_weight": _errors(w.grad, ref["grad_weight"][rows])}
    times = []
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    barrier()
    h.grad = w.grad = None
    return {**figures, "seconds": min(times), "peak_bytes": _peak_allocated(run)}


def measure_rank(case_path: Path, ref_path: Path, logps_fns: dict, start: int, end: int, dtypes, repeats: int,
                 barrier) -> list[dict]:
    """Every implementation in ``logps_fns`` (name -> ``f(hidden, weight_rows, targets)``) and dtype
    on this rank's rows ``[start, end)`` of the case's head; one dict of figures each."""
    case = torch.load(case_path, mmap=True)
    ref = torch.load(ref_path, mmap=True)
    out = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for impl, fn in logps_fns.items():
            # Fresh leaves in the run's dtype, off the memory-mapped file.
            hidden = case["hidden"].to(dtype, copy=True)
            weight_rows = case["weight"][start:end].to(dtype, copy=True)
            figures = _measure(fn, hidden, weight_rows, case["targets"], case["upstream"], ref, slice(start, end),
                               repeats, barrier)
            out.append({"impl": impl, "dtype": dtype_name, **figures})
    return out
