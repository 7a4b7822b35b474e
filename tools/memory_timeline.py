#!/usr/bin/env python
"""Where a run's memory goes: live torch bytes by phase through a real 2-rank CPU run.

    python tools/memory_timeline.py [--deepspeed ds_configs/zero3.json] [--steps 3] [key=value ...]

Makes (once, under --work) a random Llama (``--hidden``, ``--layers``, ``--vocab``) and the demo data,
then runs megakto's own trainer under ``deepspeed --num_gpus 2`` with torch's profiler recording
every CPU allocation and free (``profile_memory``, as tools/_vocab_bench.py reads them) and labels
around the step's phases: the engines' build and the reference (precompute), then per step the
reference and the policy's KL pass, each micro-batch's forward and backward, the optimizer step;
inside them DeepSpeed's ZeRO-3 gathers, reduce buckets, gradient partitioning and optimizer
sub-group steps. Each rank prints a table: bytes live (allocated by torch, from the run's start)
at each phase's entry and exit and the most inside it, the resident set and glibc's free heap at
its exit (``megakto.peak_memory.heap_figures``), the phase stack at the run's peak and what the
innermost phase holding it allocated, by block size. The profiler's running sum misses some frees
and drifts upwards over a run, so after each engine step the tool also counts the tensor storages
the garbage collector reaches: the state between steps. Differences within a phase are the
profiler's figures to read. Memory figures do not depend on the machine's load; the profiler
slows the run several-fold.

    python tools/memory_timeline.py --rss [...]

``--rss`` runs without the profiler (at full speed) and measures what the memory planner predicts
on CPU, the resident set: the kernel's peak (VmHWM), read and reset (``/proc/self/clear_refs``) at
every phase's entry and exit, inner phases included, so each phase gets the highest resident set
reached while it was open, beyond the resident set at the policy engine's build (the trainer's
baseline). Run it with ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment, as the calibration
does, so that the resident set follows live memory.
"""

import argparse
import bisect
import itertools
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

MIB = 2 ** 20
TAG = "mt:"

# (class path, method, label, top-level: a row of the table; else only named in the peak's stack).
PHASES = [
    ("megakto.runners.zero:ZeroMode", "build_policy", "build policy engine", True),
    ("megakto.trainer:KTOTrainer", "_setup_reference", "reference (build, precompute)", True),
    ("megakto.step:KTOStep", "__call__", "step", False),
    ("megakto.reference.scorers:OnlineReference", "score", "reference pass", True),
    ("megakto.reference.scorers:CachedReference", "score", "reference (cached)", True),
    ("megakto.runners.zero:ZeroRunner", "score", "policy KL pass", True),
    ("megakto.runners.zero:ZeroRunner", "_forward", "policy forward+loss", True),
    ("deepspeed.runtime.engine:DeepSpeedEngine", "backward", "policy backward", True),
    ("deepspeed.runtime.engine:DeepSpeedEngine", "step", "engine step", True),
    ("deepspeed.runtime.zero.partitioned_param_coordinator:PartitionedParameterCoordinator", "fetch_sub_module",
     "zero3 gather", False),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3",
     "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads", "zero3 reduce bucket", False),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "partition_grads", "zero3 partition grads", False),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "_prepare_fp32_grad_for_sub_group",
     "zero3 fp32 grad", False),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "_optimizer_step", "adam sub-group", False),
    ("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "_unflatten_partitioned_parameters",
     "zero3 unflatten", False),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "reduce_ipg_grads", "zero2 reduce bucket", False),
    ("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "_optimizer_step", "adam group", False),
    ("megakto.runners.pipeline:PipelineMode", "build_policy", "build policy engine", True),
    ("megakto.runners.pipeline:PipelineRunner", "score", "pipeline eval (reference, KL)", True),
    ("megakto.runners.pipeline:PipelineRunner", "train", "pipeline train batch", True),
    ("deepspeed.runtime.pipe.engine:PipelineEngine", "_exec_forward_pass", "pipe forward", False),
    ("deepspeed.runtime.pipe.engine:PipelineEngine", "_exec_backward_pass", "pipe backward", False),
    ("deepspeed.runtime.pipe.engine:PipelineEngine", "_exec_reduce_grads", "pipe reduce grads", False),
    ("deepspeed.runtime.pipe.engine:PipelineEngine", "_exec_optimizer_step", "pipe optimizer step", False),
]


def _census() -> dict:
    """Bytes of every distinct tensor storage the garbage collector can reach now, and the largest
    sizes with their counts: a cross-check of the profiler's running sum between steps."""
    import gc

    import torch

    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - tensors without storage (meta, sparse, functional wrappers)
            continue
    sizes = {}
    for n in seen.values():
        sizes[n] = sizes.get(n, 0) + 1
    return {"census": sum(seen.values()), "census_sizes": sorted(sizes.items(), key=lambda nc: -nc[0] * nc[1])[:8]}


def _label(records: list, top: bool, name: str, fn):
    import functools

    import torch

    from megakto.peak_memory import heap_figures

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(TAG + name):
            out = fn(*args, **kwargs)
        if top:
            records.append({**heap_figures(), **(_census() if name == "engine step" else {})})
        return out
    return wrapped


def _install(records: list, label=None) -> None:
    import importlib

    for path, attr, name, top in PHASES:
        module, cls = path.split(":")
        owner = getattr(importlib.import_module(module), cls)
        original = getattr(owner, attr)
        wrapped = (label or _label)(records, top, name, original)
        setattr(owner, attr, wrapped)
        # deepspeed.pipe runs its instructions from a class-level map of the original functions
        table = owner.__dict__.get("_INSTRUCTION_MAP")
        if isinstance(table, dict):
            for kind, fn in list(table.items()):
                if fn is original:
                    table[kind] = wrapped


class RssPeaks:
    """Each phase's highest resident set while it is open (inner phases too), from the kernel's peak
    counter read and reset at every phase boundary: at each boundary the peak since the previous
    one is credited to every phase open across it."""

    def __init__(self, read_hwm, reset_hwm):
        self._read, self._reset = read_hwm, reset_hwm
        self.open: list[list] = []  # [name, peak] of the phases open now, outermost first
        self.done: list[tuple[str, int, int, int]] = []  # (name, depth, peak, resident set at entry)

    def _boundary(self) -> int:
        hwm = self._read()
        for frame in self.open:
            frame[1] = max(frame[1], hwm)
        self._reset()
        return hwm

    def enter(self, name: str, rss_now: int) -> None:
        self._boundary()
        self.open.append([name, rss_now, rss_now])

    def exit(self) -> None:
        self._boundary()
        name, peak, entry = self.open.pop()
        self.done.append((name, len(self.open), peak, entry))


def _rss_label(records, top, name, fn):
    import functools

    from megakto.peak_memory import _status_bytes

    tracker = records[0]

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        tracker.enter(name, _status_bytes("VmRSS"))
        try:
            return fn(*args, **kwargs)
        finally:
            tracker.exit()
    return wrapped


def _rss_rank(args, overrides: list[str]) -> int:
    from megakto.config import load_config
    from megakto.distributed import comm
    from megakto.distributed.engine import configure_cpu_threads
    from megakto.peak_memory import _reset_hwm, _status_bytes
    from megakto.startup import offloads_to_host
    from megakto.trainer import KTOTrainer

    cfg = load_config(None, overrides)
    configure_cpu_threads(offloaded=offloads_to_host(cfg, args.deepspeed))
    tracker = RssPeaks(lambda: _status_bytes("VmHWM"), _reset_hwm)
    _install([tracker], label=_rss_label)
    KTOTrainer(cfg, args.deepspeed).train()
    base = next(entry for name, _, _, entry in tracker.done if name == "build policy engine")
    rows = [{"name": n, "depth": d, "peak": p - base, "added": p - e} for n, d, p, e in tracker.done]
    with open(os.path.join(args.out, f"rank{comm.rank()}.json"), "w") as f:
        json.dump({"rank": comm.rank(), "rss_rows": rows}, f)
    return 0


def _print_rss(data: dict) -> None:
    """The top-level phases in call order, then each inner kind's highest figures."""
    print(f"rank {data['rank']}: resident set, MiB beyond the resident set at the policy engine's build")
    print(f"{'phase':32s} {'peak':>7s} {'added':>7s}")
    rows = data["rss_rows"]
    top = {p[2] for p in PHASES if p[3]}
    for r in rows:
        if r["name"] in top:
            print(f"{r['name']:32s} {r['peak'] / MIB:7.0f} {r['added'] / MIB:7.0f}")
    inner = {}
    for r in rows:
        if r["name"] not in top:
            best = inner.setdefault(r["name"], [0, 0])
            best[0], best[1] = max(best[0], r["peak"]), max(best[1], r["added"])
    for name, (peak, added) in inner.items():
        print(f"  inside: {name:23s} {peak / MIB:7.0f} {added / MIB:7.0f}")
    worst = max(rows, key=lambda r: r["peak"])
    print(f"peak {worst['peak'] / MIB:.0f} MiB in {worst['name']}")


def timeline(memory: list[tuple[int, int]], ranges: list[tuple[int, int, str]],
             phases: frozenset = frozenset()) -> tuple[list[dict], dict]:
    """``memory``: (time, bytes ±) of every allocation and free; ``ranges``: (start, end, name) of the
    labelled phases. Per range its live bytes at entry and exit and the most inside it; and the peak:
    its bytes, time, the stack of ranges holding it, and what the innermost of them named in
    ``phases`` (else the outermost) added by then, by block size (frees matched to allocations of
    the same size). Pure."""
    memory = sorted(memory)
    times = [t for t, _ in memory]
    live = list(itertools.accumulate((b for _, b in memory), initial=0))  # live[i]: before event i
    rows = []
    for start, end, name in sorted(ranges):
        i, j = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        rows.append({"name": name, "start": start, "entry": live[i], "exit": live[j], "most": max(live[i:j + 1])})
    k = max(range(len(live)), key=live.__getitem__)
    at = times[k - 1] if k else 0
    holding = [(s, n) for s, e, n in sorted(ranges) if s <= at <= e]
    named = [h for h in holding if h[1] in phases]
    since = (named[-1] if named else holding[0])[0] if holding else times[0] if times else 0
    net = {}
    for t, b in memory[bisect.bisect_left(times, since):k]:
        net[abs(b)] = net.get(abs(b), 0) + (1 if b > 0 else -1)
    sizes = sorted(((n, c) for n, c in net.items() if c > 0), key=lambda nc: -nc[0] * nc[1])
    return rows, {"bytes": live[k], "time": at, "stack": [n for _, n in holding],
                  "since": (named[-1] if named else holding[0])[1] if holding else None, "sizes": sizes}


def _rank(args, overrides: list[str]) -> int:
    from torch.profiler import ProfilerActivity, profile

    from megakto.config import load_config
    from megakto.distributed import comm
    from megakto.distributed.engine import configure_cpu_threads
    from megakto.startup import offloads_to_host
    from megakto.trainer import KTOTrainer

    cfg = load_config(None, overrides)
    configure_cpu_threads(offloaded=offloads_to_host(cfg, args.deepspeed))
    records = []
    _install(records)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        KTOTrainer(cfg, args.deepspeed).train()
    events = list(prof.profiler.kineto_results.events())
    memory = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]
    ranges = [(e.start_ns(), e.start_ns() + e.duration_ns(), e.name()[len(TAG):]) for e in events
              if e.name().startswith(TAG)]
    top = frozenset(p[2] for p in PHASES if p[3])
    rows, peak = timeline(memory, ranges, top)
    tops = [r for r in rows if r["name"] in top]
    for r, heap in zip(tops, records):  # both in call order (ranges of top phases never nest)
        r.update(heap)
    inner = {}
    for r in rows:  # the most each inner kind added above its own entry
        if r["name"] not in {t["name"] for t in tops}:
            inner[r["name"]] = max(inner.get(r["name"], 0), r["most"] - r["entry"])
    out = {"rank": comm.rank(), "rows": tops, "inner": inner, "peak": peak}
    with open(os.path.join(args.out, f"rank{comm.rank()}.json"), "w") as f:
        json.dump(out, f)
    return 0


def _print(data: dict) -> None:
    print(f"rank {data['rank']}: MiB live (torch allocations since the run's start)")
    print(f"{'phase':32s} {'entry':>7s} {'most':>7s} {'exit':>7s} {'RSS':>7s} {'heap free':>9s} {'mmapped':>8s}")
    for r in data["rows"]:
        print(f"{r['name']:32s} {r['entry'] / MIB:7.0f} {r['most'] / MIB:7.0f} {r['exit'] / MIB:7.0f} "
              f"{r.get('rss', 0) / MIB:7.0f} {r.get('heap_free', 0) / MIB:9.0f} {r.get('mmapped', 0) / MIB:8.0f}")
    for r in data["rows"]:
        if "census" in r:
            print(f"after an engine step: {r['census'] / MIB:.0f} MiB in storages the garbage collector reaches "
                  f"(profiler: {r['exit'] / MIB:.0f}); largest: "
                  + ", ".join(f"{n / MIB:.1f} x {c}" for n, c in r["census_sizes"]))
    print("most added inside one call, MiB: " + ", ".join(f"{k} {v / MIB:.0f}" for k, v in data["inner"].items()))
    print(f"peak {data['peak']['bytes'] / MIB:.0f} MiB live in: {' > '.join(data['peak']['stack'])}")
    sizes = data["peak"]["sizes"]
    print(f"held at the peak since the entry of {data['peak']['since'] or 'the run'}, "
          f"by block size (MiB x count): " + ", ".join(f"{n / MIB:.2f} x {c}" for n, c in sizes[:12])
          + f"; {sum(n * c for n, c in sizes[12:]) / MIB:.0f} MiB in {sum(c for _, c in sizes[12:])} smaller blocks")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", default="ds_configs/zero3.json", help="the policy's DeepSpeed JSON")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the peak lands in step 2 or later)")
    shape = parser.add_argument_group("the random Llama (heads of 128, 2 query heads per key-value head, MLP 2.75x)")
    shape.add_argument("--hidden", type=int, default=1024)
    shape.add_argument("--layers", type=int, default=4)
    shape.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--name", default="run", help="this run's folder under --work/out")
    parser.add_argument("--port", type=int, default=30020, help="the ranks' --master_port")
    parser.add_argument("--work", default=os.path.join(REPO, "outputs", "memory_timeline"))
    parser.add_argument("--rss", action="store_true", help="no profiler: each phase's peak resident set (fast)")
    parser.add_argument("--point", metavar="NAME", help="a calibration grid point's shape, DeepSpeed JSON and settings "
                        "(tools/calibrate_memory.py GRID) instead of --hidden/--layers/--vocab/--deepspeed")
    parser.add_argument("--out", help=argparse.SUPPRESS)  # set for the ranks
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.out:  # a rank
        return (_rss_rank if args.rss else _rank)(args, args.overrides)
    from _launch import launcher_command, rank_env
    from calibrate_memory import _assets, grid

    out = os.path.join(args.work, "out", args.name)
    shutil.rmtree(os.path.join(out, "run"), ignore_errors=True)  # a fresh reference cache: the precompute runs
    os.makedirs(out, exist_ok=True)
    if args.point:
        points = {p[0]: p for p in grid()}
        if args.point not in points:
            raise SystemExit(f"--point: no grid point named {args.point}")
        _, shape, args.deepspeed, extra, _ = points[args.point]
        model, data = _assets(args.work, shape, prompts=24)
        settings = ["data.max_length=64", "train.global_batch_size=16", "train.micro_batch_size=4", *extra]
    else:
        shape = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 128,
                     num_kv_heads=max(1, args.hidden // 256), intermediate_size=int(args.hidden * 2.75) // 64 * 64,
                     vocab_size=args.vocab)
        model, data = _assets(args.work, shape)
        settings = ["data.max_length=256", "train.global_batch_size=8", "train.micro_batch_size=4"]
    overrides = [f"model.path={model}", f"data.train_files={data}", *settings, f"train.max_steps={args.steps}",
                 "train.eval_samples=0", f"output_dir={out}/run", f"ref.cache_dir={out}/run/ref_cache",
                 "checkpoint.every_steps=0", *args.overrides]
    cmd = launcher_command(os.path.abspath(__file__), ["--deepspeed", args.deepspeed, "--out", out,
                                                       *(["--rss"] if args.rss else []), *overrides], nproc=2)
    cmd[cmd.index("--master_port") + 1] = str(args.port)
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env({"PYTHONPATH": REPO}), capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    for line in proc.stdout.splitlines():
        if "peak memory" in line and not args.rss:  # --rss resets the counter the trainer reads
            print(line.split("] ", 1)[-1])
    for rank in range(2):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            data = json.load(f)
        (_print_rss if args.rss else _print)(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
