#!/usr/bin/env python
"""Calibration of the memory planner: real 2-rank CPU runs, predicted vs measured peak per rank.

    python tools/calibrate_memory.py [--only NAME ...] [--steps 3] [--json calib.json]
    python tools/calibrate_memory.py --grid --json tools/calibration_grid.json --malloc-mmap-threshold 1048576

``--grid`` runs the held-out grid instead (shapes the planner was never tuned on, see GRID): each point is
written to the JSON as soon as it is measured (a re-run skips the points already there), self-describing
(shape, DeepSpeed JSON, overrides, allocator setting, the largest micro-batch the dry run plans from
the data, measured bytes), so that ``tests/planning/test_stated_accuracy.py`` re-predicts every point
without running anything: the plan ``launch/train_kto.py --dry-run`` prints for that run (its data's
largest micro-batch), and beside it the plan without data (``tools/plan_memory.py``: the worst
micro-batch the config allows, an upper bound).

Each configuration makes (once, under --work) a random Llama of its shape and the demo data, runs
``deepspeed --num_gpus 2 launch/train_kto.py`` on it, reads the run's final line (the peak RSS beyond
the RSS before the engines were built, max over ranks) and prints it beside the planner's
``peak_bytes_per_rank`` for the same command line (``--device cpu``). It measures, never asserts.
Run it alone on the machine: other jobs do not change RSS, but the 7B-width point needs ~10 GB.
"""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from _launch import launcher_command, rank_env  # noqa: E402

# (name, model shape, DeepSpeed JSON, overrides). The 7B-width point trains on 24 prompts (48 rows: the 3 steps'
# 16-row batches): its cache precompute of the 400 prompts' 800 rows was still running after 12 minutes on the
# shared 2-core machine. The row count does not change the plan (it reads micro-batch sizes only).
MID = dict(hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=2816, vocab_size=8192)
WIDE = dict(hidden_size=4096, num_layers=2, num_heads=32, num_kv_heads=32, intermediate_size=11008, vocab_size=8192)
CONFIGS = [
    ("zero3-online-offload", MID, "ds_configs/zero3.json", ["ref.mode=online", "ref.offload=cpu"]),
    ("zero3-online-nooffload", MID, "ds_configs/zero3.json", ["ref.mode=online", "ref.offload=none"]),
    ("zero3-cache", MID, "ds_configs/zero3.json", ["ref.mode=cache"]),
    ("zero2-online", MID, "ds_configs/zero2.json", ["ref.mode=online", "ref.offload=none"]),
    ("zero2-cache-ckpt", MID, "ds_configs/zero2.json", ["ref.mode=cache", "model.gradient_checkpointing=true"]),
    ("zero3-offload-opt", MID, "ds_configs/zero3_offload_optimizer.json", ["ref.mode=cache"]),
    ("zero3-ckpt-rows256", MID, "ds_configs/zero3.json",
     ["ref.mode=cache", "model.gradient_checkpointing=true", "data.max_tokens_per_row=256", "train.micro_batch_size=8"]),
    ("zero3-nopack", MID, "ds_configs/zero3.json", ["ref.mode=cache", "data.packing=false"]),
    ("7b-width-zero3-bf16", WIDE, "ds_configs/zero3.json", ["ref.mode=cache", "model.dtype=bfloat16"]),
]


# The held-out grid: three widths (MLP ratios 2.75 and 4, vocabularies 12000-32000, grouped and full
# attention) x two depths x ZeRO 1/2/3 x online/cached reference x packing on/off, a TP2 and a PP2 point, and
# the default-allocator points. Short runs: 3 steps of 16 rows of at most 64 tokens from 24 prompts (a point
# took 0.5-8 minutes on the shared 2-core machine under other jobs' load).
W512 = dict(hidden_size=512, num_heads=8, num_kv_heads=2, intermediate_size=1408, vocab_size=32000)
W1024 = dict(hidden_size=1024, num_heads=16, num_kv_heads=16, intermediate_size=4096, vocab_size=16384)
W2048 = dict(hidden_size=2048, num_heads=16, num_kv_heads=4, intermediate_size=5632, vocab_size=12000)
DEPTHS = {"w512": (W512, (2, 6)), "w1024": (W1024, (2, 6)), "w2048": (W2048, (1, 3))}
ZERO = {1: "ds_configs/zero1.json", 2: "ds_configs/zero2.json", 3: "ds_configs/zero3.json"}
REF = {"online": ["ref.mode=online", "ref.offload=none"], "cache": ["ref.mode=cache"]}
MMAP = "mmap"  # the allocator setting the calibration documents (--malloc-mmap-threshold); "default" = glibc's


def grid() -> list[tuple[str, dict, str, list[str], str]]:
    """(name, shape, DeepSpeed JSON, overrides, allocator) of every grid point, the most informative
    first, so that a grid cut short by the clock still covers every width, depth, stage and mode: the
    narrow shallow shape's full factorial (packing on and off), the other shallow shapes packed, the TP2,
    PP2 and default-allocator points, the deep shapes packed (ZeRO-3 first), then packing off elsewhere."""
    def point(width, deep, stage, ref, pack):
        shape, depths = DEPTHS[width]
        name = f"{width}-l{depths[deep]}-zero{stage}-{ref}-{pack}"
        packing = f"data.packing={str(pack == 'pack').lower()}"
        return name, dict(shape, num_layers=depths[deep]), ZERO[stage], [*REF[ref], packing], MMAP

    modes = [(stage, ref) for stage in (1, 2, 3) for ref in REF]
    points = [point("w512", 0, stage, ref, pack) for stage, ref in modes for pack in ("pack", "nopack")]
    points += [point("w1024", 0, stage, ref, "pack") for stage, ref in modes]
    tp_pp = dict(W1024, num_layers=2)
    points += [("w1024-l2-tp2-zero1-cache-pack", tp_pp, ZERO[1], ["ref.mode=cache", "parallel.tp_size=2"], MMAP),
               ("w1024-l2-pp2-zero1-cache-pack", tp_pp, ZERO[1], ["ref.mode=cache", "parallel.pp_size=2"], MMAP),
               ("w1024-l2-zero3-online-offload-pack", tp_pp, ZERO[3],
                ["ref.mode=online", "ref.offload=cpu", "data.packing=true"], MMAP)]
    for name, ds, extra in (("zero3-online-offload", ZERO[3], ["ref.mode=online", "ref.offload=cpu"]),
                            ("zero3-cache", ZERO[3], REF["cache"]), ("zero2-online", ZERO[2], REF["online"])):
        points.append((f"w1024-l2-{name}-pack-glibc", tp_pp, ds, [*extra, "data.packing=true"], "default"))
    points += [point("w2048", 0, stage, ref, "pack") for stage, ref in modes]
    points += [point(width, 1, stage, ref, "pack") for stage in (3, 2, 1) for ref in REF for width in DEPTHS]
    points += [point(width, 0, stage, ref, "nopack") for width in ("w1024", "w2048") for stage, ref in modes]
    return points


def _assets(work: str, shape: dict, prompts: int | None = None) -> tuple[str, str]:
    """The random model of ``shape`` and the demo data (fewer prompts for the 7B-width model and the grid)."""
    from megakto._demo.data import write_demo_data
    from megakto._demo.tiny_model import make_tiny_model

    model = os.path.join(work, "model-h{hidden_size}-l{num_layers}-v{vocab_size}".format(**shape)
                         + ("" if prompts is None else "-i{intermediate_size}-a{num_heads}-k{num_kv_heads}".format(**shape)))
    if not os.path.isfile(os.path.join(model, "config.json")):
        make_tiny_model(model, seed=0, max_position_embeddings=512, **shape)
    prompts, eval_prompts = (prompts, 4) if prompts else (24, 4) if shape is WIDE else (400, 60)
    data = os.path.join(work, f"data-{prompts}")
    if not os.path.isfile(os.path.join(data, "train.jsonl")):
        write_demo_data(data, n_train_prompts=prompts, n_eval_prompts=eval_prompts, seed=0)
    return model, os.path.join(data, "train.jsonl")


def _measure(ds: str, overrides: list[str], mmap_threshold: int | None) -> float:
    return _run(ds, overrides, mmap_threshold)[0]


def _run(ds: str, overrides: list[str], mmap_threshold: int | None) -> tuple[float, float]:
    """(peak beyond the RSS before the engines were built, freed heap glibc keeps at the end), max over ranks."""
    env = {"PYTHONPATH": REPO, **({"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {})}
    proc = subprocess.run(launcher_command(os.path.join(REPO, "launch", "train_kto.py"), ["--deepspeed", ds, *overrides],
                                           nproc=2), cwd=REPO, env=rank_env(env),
                          capture_output=True, text=True, timeout=1200)
    found = re.search(r"peak memory (\d+\.\d+) GiB on the fullest rank", proc.stdout)
    if proc.returncode or not found:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    kept = re.search(r"glibc now keeps (\d+\.\d+) GiB", proc.stdout)
    return float(found.group(1)) * 2 ** 30, float(kept.group(1)) * 2 ** 30 if kept else 0.0


def dry_run_tokens(ds: str, overrides: list[str]) -> list[int]:
    """The largest micro-batch of the run's 3 steps as ``launch/train_kto.py --dry-run`` plans it from
    the data (tokens, scored tokens, rows, row length): what its plan, the one a user reads before the
    run, is made for."""
    from megakto.config import load_config
    from megakto.dry_run import dry_run

    plan = dry_run(load_config(None, overrides), ds, 2, on_gpu=False, overrides=tuple(overrides), log=lambda line: None)
    return list(dataclasses.astuple(plan.inputs.train_tokens))


def run_grid(args) -> int:
    """Measure every grid point not yet in ``args.json``, rewriting the file after each."""
    import dataclasses
    import platform
    import time

    from megakto.planning.run_plan import PlanRequest, make_plan

    rows = []
    if os.path.isfile(args.json):
        with open(args.json) as f:
            rows = json.load(f)["points"]
    done = {r["name"] for r in rows}
    threshold = args.malloc_mmap_threshold or 1048576
    print(f"{'point':42s} {'predicted MiB':>14s} {'measured MiB':>13s} {'error':>7s} {'retained MiB':>13s}", flush=True)
    points = {p[0]: p for p in grid()}
    unknown = sorted(set(args.only or ()) - set(points))
    if unknown:
        raise SystemExit(f"--only: no grid point named {', '.join(unknown)}")
    for name, shape, ds, extra, alloc in (points[n] for n in args.only) if args.only else points.values():
        if name in done:
            continue
        model, data = _assets(args.work, shape, prompts=24)
        out = os.path.join(args.work, "runs", name)
        common = ["data.max_length=64", "train.global_batch_size=16", "train.micro_batch_size=4",
                  f"train.max_steps={args.steps}", "train.eval_samples=0", "checkpoint.every_steps=0"]
        paths = [f"model.path={model}", f"data.train_files={data}", f"output_dir={out}", f"ref.cache_dir={out}/ref_cache"]
        cfg, plan = make_plan(PlanRequest(None, ds, tuple(paths + common + extra), 2, on_gpu=False))
        start = time.time()
        try:
            measured, retained = _run(ds, paths + common + extra, threshold if alloc == MMAP else None)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"{name}: failed: {str(exc)[-600:]}", flush=True)
            continue
        with open(os.path.join(REPO, ds)) as f:
            ds_json = json.load(f)
        tokens = dry_run_tokens(ds, paths + common + extra)
        rows.append({"name": name, "shape": shape, "model_shape": dataclasses.asdict(plan.inputs.shape),
                     "deepspeed": ds, "ds_config": ds_json, "overrides": common + extra, "world_size": 2,
                     "logps": plan.inputs.logps, "dry_run_tokens": tokens,
                     "allocator": {"MALLOC_MMAP_THRESHOLD_": threshold} if alloc == MMAP else "glibc defaults",
                     "measured_bytes": measured, "retained_bytes": retained,
                     "predicted_bytes_when_measured": plan.peak_bytes_per_rank, "peak_phase": plan.peak_phase,
                     "seconds": round(time.time() - start)})
        err = plan.peak_bytes_per_rank / measured - 1
        print(f"{name:42s} {plan.peak_bytes_per_rank / 2**20:14.0f} {measured / 2**20:13.0f} {err:+7.1%} "
              f"{retained / 2**20:13.0f}", flush=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
                       f"{_cpu_name()}", "steps": args.steps, "points": rows}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


def print_grid(path: str, *, markdown: bool = False) -> int:
    """Each point of a grid JSON re-predicted now: predicted, measured (and glibc's retained heap), error;
    the worst |error| over the live-peak points is the planner's stated accuracy."""
    from megakto.planning.accuracy import STATED_ACCURACY_PERCENT, grid_errors, stated_percent

    with open(path) as f:
        points = {p["name"]: p for p in json.load(f)["points"]}
    errors = grid_errors(path, live_only=False)
    no_data = {e[0]: e for e in grid_errors(path, live_only=False, with_data=False)}
    fmt = ("| {} | {:.0f} | {:.0f} | {:.0f} | {:+.1%} | {:.0f} ({:+.1%}) |" if markdown else
           "{:44s} {:10.0f} {:10.0f} {:10.0f} {:+7.1%} {:9.0f} ({:+.1%})")
    print("| point | dry-run plan MiB | measured MiB | retained MiB | error | plan without data MiB (error) |\n"
          "|---|---|---|---|---|---|" if markdown else
          f"{'point':44s} {'plan MiB':>10s} {'measured':>10s} {'retained':>10s} {'error':>7s}  {'plan without data':>18s}")
    for name, predicted, measured, err in errors:
        print(fmt.format(name, predicted / 2**20, measured / 2**20, points[name]["retained_bytes"] / 2**20, err,
                         no_data[name][1] / 2**20, no_data[name][3]))
    live = [e for e in errors if isinstance(points[e[0]]["allocator"], dict)]
    worst = max(live, key=lambda e: abs(e[3]))
    print(f"worst |error| under MALLOC_MMAP_THRESHOLD_=1048576: {worst[3]:+.1%} ({worst[0]}) over {len(live)} points; "
          f"stated accuracy ±{stated_percent(live)} % (megakto/planning/accuracy.py says ±{STATED_ACCURACY_PERCENT} %)")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all); with --grid, point names, "
                        "measured in the order given")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(REPO, "outputs", "calibration"))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--reuse", metavar="JSON", help="measured peaks from an earlier --json of these configurations "
                        "(the measurement does not depend on the planner): re-predict without re-running")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the runs: freed blocks above it go back to the OS, "
                        "so RSS follows live tensors (glibc's default lets it grow to 32 MiB, keeping freed "
                        "ZeRO-3 gathers in the heap)")
    parser.add_argument("--grid", action="store_true", help="run the held-out grid (GRID) into --json, point by point; "
                        "with --reuse GRID_JSON: re-predict its points with the current planner and print each error")
    parser.add_argument("--markdown", action="store_true", help="with --grid --reuse: print docs/planning.md's table")
    args = parser.parse_args(argv)
    if args.grid and args.reuse:
        return print_grid(args.reuse, markdown=args.markdown)
    if args.grid:
        if not args.json:
            parser.error("--grid needs --json (the points are written there as they are measured)")
        return run_grid(args)
    from megakto.planning.run_plan import PlanRequest, make_plan

    rows = []
    reused = {}
    if args.reuse:
        with open(args.reuse) as f:
            reused = {r["name"]: r["measured_bytes"] for r in json.load(f)}
    print(f"{'configuration':26s} {'predicted MiB':>14s} {'measured MiB':>13s} {'error':>7s}  peak phase")
    for name, shape, ds, extra in CONFIGS:
        if args.only and name not in args.only:
            continue
        model, data = _assets(args.work, shape)
        out = os.path.join(args.work, "runs", name)
        overrides = [f"model.path={model}", f"data.train_files={data}", "data.max_length=64", "train.global_batch_size=16",
                     "train.micro_batch_size=4", f"train.max_steps={args.steps}", "train.eval_samples=0",
                     f"output_dir={out}", f"ref.cache_dir={out}/ref_cache", "checkpoint.every_steps=0", *extra]
        _, plan = make_plan(PlanRequest(None, ds, tuple(overrides), 2, on_gpu=False))
        measured = reused.get(name) or _measure(ds, overrides, args.malloc_mmap_threshold)
        predicted = plan.peak_bytes_per_rank
        err = predicted / measured - 1
        rows.append({"name": name, "predicted_bytes": predicted, "measured_bytes": measured, "error": err,
                     "peak_phase": plan.peak_phase})
        print(f"{name:26s} {predicted / 2**20:14.0f} {measured / 2**20:13.0f} {err:+7.1%}  {plan.peak_phase}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
