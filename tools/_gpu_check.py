"""The Python steps of tools/gpu_check.sh, one subcommand each. Each line of the check's summary,
an error included (one line, what to do next), is printed and appended to ``--summary FILE``; what
the libraries print is not.

    python tools/_gpu_check.py [--summary FILE] versions --device cuda
    python tools/_gpu_check.py [--summary FILE] packing --device cuda --dir DIR [--family qwen3 ...]
    python tools/_gpu_check.py [--summary FILE] summary BENCH_JSON [--workdir BENCH_WORKDIR]
    python tools/_gpu_check.py [--summary FILE] memory --device cuda --dir DIR [--family qwen3 ...]

``versions``: the packages megakto runs on and the device; refuses (exit 1) a missing package, one
outside megakto's tested range (megakto.distributed.ds_config.check_versions) or ``--device cuda``
where torch sees no GPU. ``packing``: megakto's start-up packing check
(:func:`megakto.model.packing_check.check_packing`) on a random-init model of the benchmark's
family and width in each attention implementation and dtype the device offers, packed rows and
padded rows. ``summary``: the figures of a ``tools/bench.py --json`` report, one line per system and
per ratio, and the packing check the trainer ran at start-up, read from a worker's log. ``memory``: a
short ZeRO-3 run's measured peak beside its dry-run plan; on a GPU what is live at the peak, by the code
that allocated it (``MEGAKTO_CUDA_MEMORY_HISTORY``, tools/cuda_memory_peak.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from _bench_workload import SPECIALS, add_model_args, model_shape, write_model  # noqa: E402

# What megakto's trainer and this check import; trl and flash_attn are optional.
REQUIRED = ("torch", "deepspeed", "transformers", "datasets", "accelerate", "safetensors", "yaml", "tensorboard")
WHEELS_HINT = "put their wheels in one folder and rerun with MEGAKTO_WHEELS=DIR (installed with pip --no-index)"
_summary_file: list[str] = []  # --summary, when given


def say(line: str) -> None:
    """One line of the summary: printed, and appended to ``--summary``."""
    print(line, flush=True)
    for path in _summary_file:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def versions(device: str) -> int:
    missing = []
    for module in REQUIRED:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        say(f"versions: missing Python packages: {', '.join(missing)}; {WHEELS_HINT}")
        return 1
    import torch

    from megakto.distributed.ds_config import check_versions
    from megakto.errors import ConfigError

    cuda = torch.version.cuda or "none (a CPU build of torch)"
    nccl = "none"
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()  # a tuple (2, 21, 5); an int in old releases
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    found = ", ".join(f"{pkg} {_version(pkg) or 'not installed'}" for pkg in
                      ("deepspeed", "transformers", "datasets", "accelerate", "trl", "flash_attn"))
    say(f"versions: python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {cuda}, NCCL {nccl}, {found}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        say(f"device: {torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.1f} GiB, "
              f"compute capability {props.major}.{props.minor}, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        say(f"device: cpu, {len(os.sched_getaffinity(0))} usable cores (torch sees no GPU)")
    try:
        check_versions()
    except ConfigError as err:
        say(f"versions: {err}")
        return 1
    if device == "cuda" and not torch.cuda.is_available():
        say("versions: torch sees no GPU (torch.cuda.is_available() is False: a CPU build of torch, or no "
              "driver); bash tools/gpu_check.sh --cpu runs the check on CPU")
        return 1
    return 0


def _settings(device: str) -> list[tuple[str, str]]:
    """(attention, dtype) pairs to check: sdpa in float32 (a random-init model's leak shows only
    within float32's tolerance: see megakto.model.packing_check.tolerance) and in bfloat16 (the GPU
    run's dtype); flash_attention_2 in bfloat16 (it takes no float32) where flash_attn is installed."""
    pairs = [("sdpa", "float32"), ("sdpa", "bfloat16")]
    if device == "cuda" and _version("flash_attn"):
        pairs.append(("flash_attention_2", "bfloat16"))
    return pairs


def packing(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from megakto.errors import ModelError
    from megakto.model.forward import logps_function
    from megakto.model.packing_check import check_packing

    n_params, shape = write_model(args.dir, vocab_size=args.vocab, seed=0, longest=64, **model_shape(args))
    what = (f"{shape['family']}, {n_params / 1e6:.1f}M parameters: hidden {shape['hidden_size']}, "
            f"{shape['num_hidden_layers']} layers, vocab {args.vocab}")
    failed = 0
    for attn, dtype_name in _settings(args.device):
        dtype = getattr(torch, dtype_name)
        try:  # a flash_attn built for another torch or CUDA fails here
            model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=dtype, attn_implementation=attn)
            model.to(args.device)
        except Exception as err:  # noqa: BLE001 - reported as one line, the other settings still run
            failed += 1
            say(f"packing check {attn} {dtype_name} on {args.device}: FAILED to load the model: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        for packed in (True, False):
            layout = "packed rows" if packed else "padded rows"
            try:
                r = check_packing(model, logps_function("chunked", attn=attn), attn=attn, packing=packed,
                                  pad_id=SPECIALS.index("<pad>"), vocab_size=args.vocab, dtype=dtype,
                                  device=args.device)
            except ModelError as err:
                failed += 1
                say(f"packing check {attn} {dtype_name} {layout} on {args.device}: FAILED: {err}")
                continue
            say(f"packing check {attn} {dtype_name} {layout} on {args.device}: passed (max diff "
                  f"{r.max_diff:.2g} nats, {r.worst:.0%} of the rounding tolerance; {what})")
        del model
    if args.device == "cuda" and not _version("flash_attn"):
        say("packing check flash_attention_2: not run (flash_attn is not installed)")
    return 1 if failed else 0


def _trainer_check(workdir: str | None, system: str) -> str:
    """The start-up packing check line of a megakto worker's log (bench.py writes SYSTEM.log)."""
    log = Path(workdir or "", f"{system}.log")
    if not workdir or not log.exists():
        return "not found (no worker log)"
    lines = [ln.split("packing check: ", 1)[1] for ln in log.read_text(errors="replace").splitlines()
             if "packing check: " in ln]
    return lines[-1] if lines else "not found in the log"


def summary(path: str, workdir: str | None) -> int:
    if not Path(path).exists():
        say(f"benchmark: no report at {path} (tools/bench.py stopped before writing it: see its output)")
        return 1
    report = json.loads(Path(path).read_text())
    work, settings = report["workload"], report["settings"]
    shape = work["model_shape"]
    say(f"model: {shape.get('family', 'llama')}, {work['n_params'] / 1e6:.1f}M parameters (hidden "
          f"{shape['hidden_size']}, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads / "
          f"{shape['num_key_value_heads']} KV heads, intermediate {shape['intermediate_size']}, vocab "
          f"{work['vocab_size']}), random init; ZeRO-3 world 1 on {report['machine']['device']}, dtype "
          f"{settings['dtype']}, global batch {settings['batch']} (micro {settings['micro_batch']}), "
          f"{settings['warmup']} warmup + {settings['steps']} timed steps; megakto overrides "
          f"{' '.join(settings['megakto_overrides']) or 'none'}")
    failed = 0
    for name, r in report["results"].items():
        if not r.get("ok"):
            failed += 1
            say(f"{name}: FAILED: {r.get('error', '?')} (log: {r.get('log', '?')})")
            continue
        gpu = (f", peak GPU {r['peak_gpu_mib']:.0f} MiB (reserved {r['peak_gpu_reserved_mib']:.0f} MiB)"
               if r.get("peak_gpu_mib") is not None else "")
        pre = f", precompute {r['precompute_s']:.1f} s" if r.get("precompute_s") else ""
        say(f"{name}: {r['tokens_per_s']:.1f} target tokens/s{gpu}, peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"setup {r['setup_s']:.1f} s{pre}")
    for label, value in report["ratios"].items():
        if value is not None:
            say(f"ratio: {label} = {value:.3f}")
    if "megakto-kto" in report["results"]:
        say(f"packing check trainer start-up (megakto-kto, its engine, dtype and attention): "
              f"{_trainer_check(workdir, 'megakto-kto')}")
    return 1 if failed else 0


def _last(pattern: str, text: str) -> float | None:
    import re

    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def memory(args) -> int:
    """A 3-step ZeRO-3 run (reference offloaded, world 1) of a random-init model of the benchmark's
    family and width, its peak beside the dry run's plan for the same command; on a GPU with every
    allocation recorded (MEGAKTO_CUDA_MEMORY_HISTORY) and the blocks live at the peak listed by the
    code that allocated them (tools/cuda_memory_peak.py)."""
    import subprocess

    from _bench_workload import write_workload
    from _launch import launcher_command, rank_env

    work = write_workload(args.dir, vocab_size=args.vocab, n_rows=32, seed=0, prompt_words=(5, 60),
                          completion_words=(5, 60), **model_shape(args))
    history = os.path.join(args.dir, "history")
    overrides = [f"model.path={work.model_dir}", f"data.train_files={work.data_file}", "data.max_length=256",
                 "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=3", "train.eval_samples=0",
                 "checkpoint.every_steps=0", "ref.offload=cpu", f"output_dir={os.path.join(args.dir, 'run')}",
                 "model.dtype=" + ("bfloat16" if args.device == "cuda" else "float32")]
    script, ds = str(REPO / "launch" / "train_kto.py"), "ds_configs/zero3.json"
    plan = subprocess.run([sys.executable, script, "--dry-run", "--world-size", "1", "--device",
                           "gpu" if args.device == "cuda" else "cpu", "--deepspeed", ds, *overrides],
                          cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
    planned = _last(r"peak per rank: ([0-9.]+) GiB", plan.stdout)
    env = {"MEGAKTO_CUDA_MEMORY_HISTORY": history} if args.device == "cuda" else {}
    run = subprocess.run(launcher_command(script, ["--deepspeed", ds, *overrides], nproc=1), cwd=REPO,
                         env=rank_env(env), capture_output=True, text=True, timeout=900)
    measured = _last(r"peak memory ([0-9.]+) GiB on the fullest rank", run.stdout)
    if run.returncode or planned is None or not measured:
        failed = run if run.returncode or not measured else plan
        tail = (failed.stdout + failed.stderr).strip().splitlines()[-1:] or ["no output"]
        say(f"memory: FAILED ({'the run' if failed is run else 'the dry run'} exited {failed.returncode}): {tail[0]}")
        return 1
    reserved = _last(r"reserved ([0-9.]+) GiB", run.stdout)
    what = (f"allocated (reserved {reserved:.2f} GiB)" if args.device == "cuda" else
            "resident set beyond the start-up's")
    say(f"memory: ZeRO-3, reference offloaded, world 1, {work.n_params / 1e6:.1f}M parameters: dry-run plan "
        f"{planned:.2f} GiB per rank, measured {measured:.2f} GiB {what}, plan error {planned / measured - 1:+.1%}")
    if args.device == "cuda":
        peak = subprocess.run([sys.executable, str(REPO / "tools" / "cuda_memory_peak.py"),
                               os.path.join(history, "rank0.pickle"), "--top", "8"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        for line in (peak.stdout + peak.stderr).strip().splitlines():
            say(f"memory at the peak: {line.strip()}")
        return peak.returncode
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", metavar="FILE", help="also append the summary lines to FILE")
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("versions")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p = sub.add_parser("packing")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--dir", required=True, help="where the random-init model is written")
    p.add_argument("--vocab", type=int, default=151936)
    add_model_args(p)
    p = sub.add_parser("memory")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--dir", required=True, help="where the model, data, run and memory history are written")
    p.add_argument("--vocab", type=int, default=151936)
    add_model_args(p)
    p = sub.add_parser("summary")
    p.add_argument("report", help="tools/bench.py --json output")
    p.add_argument("--workdir", help="tools/bench.py --workdir (its workers' logs)")
    args = parser.parse_args(argv)
    _summary_file[:] = [args.summary] if args.summary else []
    if args.step == "versions":
        return versions(args.device)
    if args.step == "packing":
        return packing(args)
    if args.step == "memory":
        return memory(args)
    return summary(args.report, args.workdir)


if __name__ == "__main__":
    sys.exit(main())
