#!/usr/bin/env python
"""Calibration of the memory planner: real 2-rank CPU runs, predicted vs measured peak per rank.

    python tools/calibrate_memory.py [--only NAME ...] [--steps 3] [--json calib.json]

Each configuration makes (once, under --work) a random Llama of its shape and the demo data, runs
``deepspeed --num_gpus 2 launch/train_kto.py`` on it, reads the run's final line (the peak RSS beyond
the RSS before the engines were built, max over ranks) and prints it beside the planner's
``peak_bytes_per_rank`` for the same command line (``--device cpu``). It measures, never asserts.
Run it alone on the machine: other jobs do not change RSS, but the 7B-width point needs ~10 GB.
"""

import argparse
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


def _assets(work: str, shape: dict) -> tuple[str, str]:
    """The random model of ``shape`` and the demo data (fewer prompts for the 7B-width model)."""
    from megakto._demo.data import write_demo_data
    from megakto._demo.tiny_model import make_tiny_model

    model = os.path.join(work, "model-h{hidden_size}-l{num_layers}-v{vocab_size}".format(**shape))
    if not os.path.isfile(os.path.join(model, "config.json")):
        make_tiny_model(model, seed=0, max_position_embeddings=512, **shape)
    prompts, eval_prompts = (24, 4) if shape is WIDE else (400, 60)
    data = os.path.join(work, f"data-{prompts}")
    if not os.path.isfile(os.path.join(data, "train.jsonl")):
        write_demo_data(data, n_train_prompts=prompts, n_eval_prompts=eval_prompts, seed=0)
    return model, os.path.join(data, "train.jsonl")


def _measure(ds: str, overrides: list[str], mmap_threshold: int | None) -> float:
    env = {"PYTHONPATH": REPO, **({"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {})}
    proc = subprocess.run(launcher_command(os.path.join(REPO, "launch", "train_kto.py"), ["--deepspeed", ds, *overrides],
                                           nproc=2), cwd=REPO, env=rank_env(env),
                          capture_output=True, text=True, timeout=1200)
    found = re.search(r"peak memory (\d+\.\d+) GiB on the fullest rank", proc.stdout)
    if proc.returncode or not found:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return float(found.group(1)) * 2 ** 30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(REPO, "outputs", "calibration"))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--reuse", metavar="JSON", help="measured peaks from an earlier --json of these configurations "
                        "(the measurement does not depend on the planner): re-predict without re-running")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the runs: freed blocks above it go back to the OS, "
                        "so RSS follows live tensors (glibc's default lets it grow to 32 MiB, keeping freed "
                        "ZeRO-3 gathers in the heap)")
    args = parser.parse_args(argv)
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
