#!/usr/bin/env python
"""What is live on the GPU at a run's peak, by the code that allocated it.

    MEGAKTO_CUDA_MEMORY_HISTORY=outputs/history deepspeed --num_gpus 8 launch/train_kto.py ...
    python tools/cuda_memory_peak.py outputs/history/rank0.pickle [--top 15]

Reads a snapshot of ``torch.cuda.memory._record_memory_history`` (megakto writes one per rank when
``MEGAKTO_CUDA_MEMORY_HISTORY`` is set: recording starts where the peak measurement starts, before
the engines are built), replays its allocations and frees, and prints the most bytes allocated at
once beyond what was allocated before the recording
(blocks freed when their free completes, as PyTorch's memory viz counts them) and the blocks live at
that moment, grouped by the innermost frame in megakto, DeepSpeed, transformers or torch: the terms
to hold against the memory plan's table (``launch/train_kto.py --dry-run``). The recording keeps its
last 1M events: record a few steps.
The same file opens in PyTorch's memory viz (https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import argparse
import pickle
import sys

MIB = 2 ** 20
HISTORY_ENTRIES = 1_000_000  # megakto.peak_memory.HISTORY_ENTRIES: the recording's ring buffer
PACKAGES = ("megakto/", "deepspeed/", "transformers/", "peft/", "torch/")


def _site(frames: list[dict]) -> str:
    """The innermost frame of the packages that name a term (megakto's first), as file:line function."""
    for package in PACKAGES:
        for frame in frames:
            name = frame.get("filename", "")
            if package in name:
                return f"{name[name.rindex(package):]}:{frame.get('line', 0)} {frame.get('name', '?')}"
    return "(no Python frame)"


def _replay(trace: list[dict], stop: int | None = None):
    """Live blocks by address and their total after each event, up to event ``stop`` (all: None)."""
    live: dict[int, dict] = {}
    total = 0
    for i, event in enumerate(trace if stop is None else trace[:stop + 1]):
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif action == "free_completed":
            freed = live.pop(event["addr"], None)
            if freed is not None:
                total -= freed["size"]
        yield i, total, live


def peak_blocks(trace: list[dict]) -> tuple[int, list[dict]]:
    """(the most bytes live at once, the allocations live then) from one device's trace: each
    ``alloc`` adds its block, each ``free_completed`` removes it (by address), as PyTorch's memory viz
    counts them (the allocator's own counter drops a block when its free is requested). Two passes:
    the peak's event, then the blocks live at it. Pure."""
    best, at = 0, None
    for i, total, _ in _replay(trace):
        if total > best:
            best, at = total, i
    if at is None:
        return 0, []
    for _, _, live in _replay(trace, at):
        pass
    return best, list(live.values())


def by_site(blocks: list[dict]) -> list[tuple[str, int, int]]:
    """(site, bytes, blocks) of the blocks grouped by :func:`_site`, largest first. Pure."""
    groups: dict[str, list[int]] = {}
    for block in blocks:
        entry = groups.setdefault(_site(block.get("frames", [])), [0, 0])
        entry[0] += block["size"]
        entry[1] += 1
    return sorted(((site, n, c) for site, (n, c) in groups.items()), key=lambda g: -g[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot", help="a rank's .pickle from MEGAKTO_CUDA_MEMORY_HISTORY")
    parser.add_argument("--top", type=int, default=15, help="how many allocation sites to print")
    args = parser.parse_args(argv)
    try:
        with open(args.snapshot, "rb") as f:
            snapshot = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        print(f"cuda_memory_peak: {args.snapshot}: not a readable memory snapshot ({err})", file=sys.stderr)
        return 1
    traces = snapshot.get("device_traces") or []
    if not any(traces):
        print(f"cuda_memory_peak: {args.snapshot}: no allocations recorded (was the run on a GPU, with "
              "MEGAKTO_CUDA_MEMORY_HISTORY set before it started?)", file=sys.stderr)
        return 1
    for device, trace in enumerate(traces):
        if not trace:
            continue
        peak, blocks = peak_blocks(trace)
        print(f"device {device}: {len(trace):,} events; peak {peak / MIB:.0f} MiB allocated at once "
              f"(beyond what was allocated before the recording started) in {len(blocks):,} blocks:")
        if len(trace) >= HISTORY_ENTRIES:
            print(f"  the trace is full ({HISTORY_ENTRIES:,} events): earlier events were dropped, and blocks "
                  "allocated before them are not counted; record fewer steps")
        groups = by_site(blocks)
        for site, n, count in groups[:args.top]:
            print(f"  {n / MIB:10.1f} MiB in {count:6d} blocks  {site}")
        rest = groups[args.top:]
        if rest:
            print(f"  {sum(g[1] for g in rest) / MIB:10.1f} MiB in {sum(g[2] for g in rest):6d} blocks  "
                  f"({len(rest)} other sites)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
