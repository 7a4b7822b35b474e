#!/usr/bin/env python
"""Throughput and memory of megakto's KTO, next to SFT on the same engine and TRL's KTOTrainer.

    python tools/bench.py [--systems megakto-kto,trl-kto,...] [--steps 6] [--warmup 2] \
        [--batch 8] [--vocab 32000] [--tp 2] [--pp 2] [--sp 2] [--ep 2] [--lora 16] [--json bench.json] \
        [--family qwen3 --hidden 1024 --layers 28 ...] [--device cuda] [--dtype bfloat16]

One invocation builds one workload (a random-init Llama, hidden 256, 4 layers, a word-level
tokenizer of ``--vocab`` ids, rows whose prompt and completion are each 5-250 words) and runs every
system on it in its own subprocess, so each starts from clean memory: one process, ``--threads``
torch threads, the same rows and the same global batch for all. Figures only; nothing is asserted.

``--family``, ``--hidden``, ``--layers``, ... set the model's class and shape (tools/gpu_check.sh:
a Qwen3-0.6B-shaped one). ``--device`` (auto = cuda where torch sees a GPU) and ``--dtype`` (auto =
megakto's: bfloat16 on GPU, float32 on CPU) apply to every system: megakto's ``model.dtype``, TRL's
float32 weights under bfloat16 autocast (``bf16=True``, the Trainer's mixed precision). On a GPU the
table adds peak GPU memory (``torch.cuda.max_memory_allocated`` over the whole worker, setup included).

``--tp N`` adds ``megakto-kto-tpN``: megakto's KTO with ``parallel.tp_size=N`` on N ranks under the
deepspeed launcher (one tensor-parallel group, the same global batch), the ``--threads`` shared out
among the ranks; its memory figures are the largest rank's. ``--pp N`` adds ``megakto-kto-ppN`` the
same way with ``parallel.pp_size=N`` (one pipeline of N stages; ZeRO 0/1, so pass ``--deepspeed
ds_configs/zero1.json``, which the PP1 baseline then uses too); the pipeline bubble of its schedule,
(N - 1) / (micro-batches + N - 1) of each step, is printed (``--micro-batch`` sets the micro-batches).
``--sp N`` adds ``megakto-kto-spN`` with ``parallel.sp_size=N`` (one sequence group of N ranks, each
running 1/N of every micro-batch's tokens; ZeRO-3); ``--completion-words MIN,MAX`` makes long rows
(e.g. ``1000,2000``), where the memory per rank is expected to fall.
``--ep N`` adds ``megakto-kto-epN`` with ``parallel.ep_size=N`` (DeepSpeed AutoEP: each MoE layer's
experts split over the N ranks, every rank data-parallel) and beside it ``megakto-kto-dpN``, plain
ZeRO-3 data parallelism on the same N ranks, rows and model; it needs ``--family qwen3_moe`` (the
demo's tiny mixture of experts, top-2, ``--experts`` per layer). Both print the memory planner's
prediction per rank (megakto/planning) next to the measured peak.
``--lora R`` adds ``megakto-kto-loraR``: megakto's KTO with LoRA adapters of rank R on the attention
and MLP projections (``model.lora.r=R``), the reference being the policy with its adapters off.

* throughput: target tokens (completion tokens of the target rows, EOS included) and rows per
  second over the timed steps, from the end of the last warmup step to the end of the last step;
  everything a step costs in each trainer (batching, logging) is inside that span.
* memory: the same for every system: the peak resident set (VmRSS) during the timed steps;
  "beyond setup" = that peak minus the RSS once the trainer is built (TRL: after KTOTrainer(...),
  before train()), which still counts optimizer states allocated at the first step; "beyond warm
  state" = that peak minus the RSS after the warmup steps, garbage collected and with freed heap
  returned to the OS (weights, optimizer states and what persists between steps): the memory a
  step needs beyond weights and optimizer states. The peak is the kernel's VmHWM, reset through /proc/self/clear_refs when the
  timed window opens; ``--sample-ms 5`` adds a thread sampling VmRSS, at a cost in speed.
* precompute: the one-off reference pass of the cached/precomputed systems. TRL's is timed
  directly; megakto's is ``trainer.precompute_seconds``, or, when that is 0 (nothing confirms a
  fresh pass), the cached system's setup time minus the online one's.
"""


from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from _bench_measure import machine_info  # noqa: E402
from _bench_report import RATIOS, add_derived, markdown, median_run, ratios  # noqa: E402
from _bench_systems import SYSTEMS, measure, parallel_variant, system_spec  # noqa: E402
from _bench_workload import add_model_args, model_shape, write_workload  # noqa: E402
from _launch import launcher_command  # noqa: E402


def worker(name: str, spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = {"system": name, "ok": True, **measure(name, spec)}
    if os.environ.get("RANK", "0") == "0":
        Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


def _worker_env(workdir: Path, name: str, threads: int, mmap_threshold: int | None = None,
                device: str = "cpu") -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # on a GPU machine too: torch, deepspeed and TRL then see none
    if mmap_threshold:
        # glibc: a fixed threshold (no dynamic raise to 32 MiB), so freed large tensors go back to
        # the OS at once and RSS follows the live tensors instead of the heap's history.
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(workdir / f"hf-cache-{name}"), TQDM_DISABLE="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    return env


def run_system(name: str, spec: dict, workdir: Path, timeout: float) -> dict:
    spec = {**spec, "out_dir": str(workdir / f"out-{name}")}
    shutil.rmtree(spec["out_dir"], ignore_errors=True)  # megakto's reference cache lives there: start empty
    spec_path, result_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(spec_path), str(result_path)]
    ranks = system_spec(name)["ranks"]
    if ranks > 1:
        cmd = launcher_command(str(Path(__file__).resolve()), cmd[2:], nproc=ranks)
    with open(log_path, "w") as log:
        try:
            env = _worker_env(workdir, name, max(1, spec["threads"] // ranks), spec.get("malloc_mmap_threshold"),
                              spec["device"])
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc == 0 and result_path.exists():
        result = json.loads(result_path.read_text())
        # Other work on the machine slows every figure; the 1-minute load average shows it.
        result["loadavg_1min_after"] = os.getloadavg()[0]
        return result
    tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["?"]
    return {"system": name, "ok": False, "error": f"exit {rc}: {tail[0][:200]}", "log": str(log_path)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {list(SYSTEMS)}")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per system")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows per optimizer step)")
    parser.add_argument("--micro-batch", type=int, default=None, help="rows per forward; default = --batch")
    parser.add_argument("--vocab", type=int, default=32000, help="tokenizer and embedding size")
    add_model_args(parser)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where every system computes; auto = cuda where torch sees a GPU")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="megakto's model.dtype and TRL's precision; auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every system")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--deepspeed", default="ds_configs/zero3.json", help="megakto's DeepSpeed JSON")
    parser.add_argument("--json", metavar="OUT", help="write every figure and the machine info here")
    parser.add_argument("--workdir", help="where the workload and logs go (default: a fresh temp dir, removed)")
    parser.add_argument("--sample-ms", type=float, default=0.0,
                        help="also sample VmRSS in a thread every N ms (slows the steps; default off: VmHWM)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra megakto config override for the megakto systems (repeatable)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run every system with glibc's MALLOC_MMAP_THRESHOLD_=BYTES: freed tensors above "
                             "it return to the OS at once, so peak RSS tracks live memory rather than heap "
                             "fragmentation (default: glibc's dynamic threshold)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every system this many times, round-robin, and report each system's "
                             "median-throughput run (this machine's speed drifts by 10-30%% between runs)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per system")
    parser.add_argument("--tp", type=int, default=1,
                        help="also run megakto-kto at parallel.tp_size=N on N ranks (megakto-kto-tpN)")
    parser.add_argument("--pp", type=int, default=1,
                        help="also run megakto-kto at parallel.pp_size=N on N ranks (megakto-kto-ppN; needs a "
                             "ZeRO 0/1 --deepspeed JSON)")
    parser.add_argument("--sp", type=int, default=1,
                        help="also run megakto-kto at parallel.sp_size=N on N ranks (megakto-kto-spN; ZeRO-3)")
    parser.add_argument("--ep", type=int, default=1,
                        help="also run megakto-kto at parallel.ep_size=N on N ranks (megakto-kto-epN) and plain "
                             "ZeRO-3 on N ranks (megakto-kto-dpN); needs --family qwen3_moe")
    parser.add_argument("--completion-words", default="5,250", metavar="MIN,MAX",
                        help="completion length range in words (tokens), inclusive; long rows for --sp")
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="also run megakto-kto with LoRA adapters of rank R (megakto-kto-loraR)")
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args(argv)
    if args.worker:  # a subprocess of this tool: it ends without the interpreter's teardown
        from megakto.distributed import comm

        comm.run_rank(lambda: worker(*args.worker))

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    ratio_defs = list(RATIOS)
    if args.ep > 1 and args.family != "qwen3_moe":
        parser.error(f"--ep {args.ep} needs a mixture of experts: add --family qwen3_moe")
    for kind, n in (("tp", args.tp), ("pp", args.pp), ("sp", args.sp), ("dp", args.ep), ("ep", args.ep)):
        if n > 1:
            variant, label = f"megakto-kto-{kind}{n}", f"{kind.upper()}{n}"
            base, base_label = (f"megakto-kto-dp{n}", f"KTO ZeRO-3 DP{n}") if kind == "ep" else ("megakto-kto", "KTO")
            names.append(variant)
            if kind == "dp":
                continue  # the expert-parallel variant's baseline
            ratio_defs.extend([
                (f"megakto KTO {label} / megakto {base_label}, tokens/s", variant, base, "tokens_per_s"),
                (f"megakto KTO {label} / megakto {base_label}, peak beyond warm state (largest rank)", variant,
                 base, "peak_beyond_warm_mib"),
                (f"megakto KTO {label} / megakto {base_label}, peak RSS (largest rank)", variant, base,
                 "peak_rss_mib"),
            ] + ([(f"megakto KTO {label} / megakto {base_label}, planned peak per rank", variant, base,
                   "planned_peak_mib")] if kind == "ep" else []))
    if args.lora:
        variant = f"megakto-kto-lora{args.lora}"
        names.append(variant)
        ratio_defs.extend([
            (f"megakto KTO LoRA r={args.lora} / megakto KTO, tokens/s", variant, "megakto-kto", "tokens_per_s"),
            (f"megakto KTO LoRA r={args.lora} / megakto KTO, peak beyond warm state", variant, "megakto-kto",
             "peak_beyond_warm_mib"),
            (f"megakto KTO LoRA r={args.lora} / megakto KTO, peak RSS", variant, "megakto-kto", "peak_rss_mib"),
        ])
    unknown = [s for s in names if s not in SYSTEMS and not parallel_variant(s)
               and not s.removeprefix("megakto-kto-lora").isdigit()]
    micro = args.micro_batch or args.batch
    if unknown or args.warmup < 1 or args.steps < 1 or args.repeat < 1 or args.batch % micro:
        parser.error(f"--systems from {list(SYSTEMS)} (unknown: {unknown}); --warmup, --steps and --repeat >= 1; "
                     f"--batch divisible by --micro-batch")
    device = args.device
    if device != "cpu":
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no GPU (torch.cuda.is_available() is False); use --device cpu")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="megakto-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # One epoch of rows is exactly the steps run, so a precompute pass covers what is trained on.
    n_rows = args.batch * (args.warmup + args.steps)
    t = time.perf_counter()
    completion_words = tuple(int(w) for w in args.completion_words.split(","))
    work = write_workload(workdir / "workload", vocab_size=args.vocab, n_rows=n_rows, seed=0,
                          completion_words=completion_words, **model_shape(args))
    print(f"workload: {n_rows} rows, vocab {args.vocab}, {work.n_params / 1e6:.1f}M parameters ({work.model_shape}), "
          f"{sum(work.target_tokens)} target tokens ({time.perf_counter() - t:.0f} s) in {workdir}", flush=True)
    spec = {"workload": work.to_dict(), "batch": args.batch, "micro_batch": micro, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "lr": args.lr, "sample_ms": args.sample_ms,
            "megakto_overrides": args.overrides, "malloc_mmap_threshold": args.malloc_mmap_threshold,
            "ds_config": str((REPO / args.deepspeed).resolve()), "device": device, "dtype": args.dtype}
    runs = {name: [] for name in names}
    for rep in range(args.repeat):  # round-robin: a slow spell of the machine hits every system
        for name in names:
            t, load = time.perf_counter(), os.getloadavg()[0]
            r = run_system(name, spec, workdir, args.timeout)
            r["loadavg_1min_before"] = load
            runs[name].append(r)
            status = f"{r['tokens_per_s']:.0f} target tokens/s" if r.get("ok") else r["error"]
            print(f"{name}{f' (run {rep + 1})' if args.repeat > 1 else ''}: {status} "
                  f"({time.perf_counter() - t:.0f} s wall, load average {load:.1f} before)", flush=True)
    results = {name: median_run(rs) for name, rs in runs.items()}
    add_derived(results, n_rows)
    ratio_rows = ratios(results, ratio_defs)
    # The GPU's name comes from a worker: the parent never initialises CUDA (a context costs GPU memory).
    info = machine_info(args.threads, next((r["device"] for r in results.values() if r.get("device")), device))
    print(f"\n{info['cpu_model']}, {info['cpus_usable']} usable cores, {args.threads} torch threads per system, "
          f"torch {info['versions']['torch']}; global batch {args.batch} (micro {micro}), {args.warmup} warmup + "
          f"{args.steps} timed steps, vocab {args.vocab}; device {info['device']}, dtype {args.dtype}; "
          f"megakto overrides {args.overrides or 'none'}; "
          f"MALLOC_MMAP_THRESHOLD_ {args.malloc_mmap_threshold or 'unset (glibc default)'}; "
          f"{'median of ' + str(args.repeat) + ' runs each' if args.repeat > 1 else 'one run each'}\n")
    print(markdown(results, ratio_rows))
    for name, r in results.items():
        if r.get("pipeline"):
            p = r["pipeline"]
            print(f"\n{name}: {p['stages']} stages, {p['micro_batches_per_step']} micro-batches per step: the 1F1B "
                  f"schedule leaves each stage idle {p['bubble']:.0%} of a step (the bubble, (stages - 1) / "
                  "(micro-batches + stages - 1))")
        if r.get("planned_peak_mib") is not None:
            print(f"\n{name}: the memory planner predicts {r['planned_peak_mib']:.0f} MiB per rank (on CPU: beyond the "
                  f"start-up baseline), measured peak RSS {r['peak_rss_mib']:.0f} MiB (largest rank, baseline "
                  "included)")
        if r.get("warning"):
            print(f"\nwarning: {name}: {r['warning']}")
    if args.json:
        report = {"machine": info, "workload": {k: v for k, v in work.to_dict().items() if k != "target_tokens"},
                  "settings": {k: v for k, v in spec.items() if k != "workload"}, "results": results,
                  "ratios": dict(ratio_rows)}
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not args.workdir and all(r.get("ok") for r in results.values()):
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
