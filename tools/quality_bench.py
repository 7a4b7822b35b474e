#!/usr/bin/env python
"""Alignment quality on verifiable tasks: megakto KTO and apo_zero_unpaired against TRL's DPOTrainer.

    python tools/quality_bench.py [--tasks sort,copy,add] [--methods kto,apo,dpo] [--betas 0.1,0.5] \
        [--init sft|random] [--steps 600] [--lr 1e-4] [--completions 8] [--jobs 2] [--out outputs/quality_bench]

Needs TRL for the DPO runs (``pip install trl``; measured with 1.16.0). For every task of
megakto._demo.tasks it writes ``--train-prompts`` prompts, each with one desirable and one
undesirable completion, in two forms of the same data: unpaired rows (prompt, completion, label;
two per prompt, for KTO) and pairs (prompt, chosen, rejected; for DPO). Every run of a task starts
from the same model, which is also its reference: with ``--init sft`` (the default, the paper's
pipeline) a random-init tiny Llama (tools/make_tiny_model.py) fine-tuned with megakto's SFT loss
on the correct answers of ``--sft-prompts`` other prompts for ``--sft-steps`` steps (reused by the
next invocation with the same settings and ``--out``); with ``--init random`` the random-init model
itself. Every run has the same budget: ``--steps`` optimizer steps of ``--completions``
completions each (KTO: that many rows; DPO: half as many pairs), the same constant learning rate,
AdamW, gradient clipping at 1, one process and one thread; ``--jobs`` runs at a time.

Measured on ``--eval-prompts`` held-out prompts, with one scorer for every system:

* reward accuracy: the share of prompts whose desirable completion gets the higher implied reward
  log pi(y|x) - log pi_ref(y|x) (ties 0.5), every ``--eval-every`` steps (the curves);
* pass rate: the share of greedy completions (up to 24 new tokens) that the task's checker accepts.
  Reward accuracy is not generation quality: a policy can rank the pair right and still write a
  wrong answer.

Methods: ``kto`` (eq. 7, z_ref from mismatched pairs), ``apo`` (kto.loss_type=apo_zero_unpaired,
no reference point), ``dpo`` (TRL DPOTrainer, sigmoid loss); ``kto@key=value`` runs KTO with
config overrides (e.g. ``kto@kto.kl_scope=microbatch``), ``kto-lrX`` KTO at X times the learning
rate. Prints a table; writes under ``--out`` ``results.json`` (every run's curve, final figures and,
for megakto runs, the per-step reference-point metrics), ``curves.png`` (held-out reward accuracy
against steps) and ``mechanism.png`` (KTO's z_ref against its rewards). Measures, never asserts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from _bench_measure import machine_info  # noqa: E402
from _launch import rank_env  # noqa: E402
from _quality_report import plot, plot_mechanism, print_table  # noqa: E402
from _quality_runs import parse_method, worker, write_task_data  # noqa: E402


# The driver -------------------------------------------------------------------------------------------

def _run_one(spec: dict, log_dir: Path, reuse: bool = False) -> dict:
    """One run in its own process; ``reuse``: the result of an earlier run of the same spec."""
    spec_path = log_dir / f"{spec['name']}.spec.json"
    if reuse and spec_path.is_file() and json.loads(spec_path.read_text()) == spec and Path(spec["result"]).is_file():
        return json.loads(Path(spec["result"]).read_text())
    spec_path.write_text(json.dumps(spec))
    shutil.rmtree(spec["out_dir"], ignore_errors=True)  # a fresh run: no earlier checkpoints to meet
    log = log_dir / f"{spec['name']}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], stdout=f, stderr=subprocess.STDOUT,
                              env=rank_env({"PYTHONPATH": str(REPO)}))
    wall = time.perf_counter() - start
    if proc.returncode or not Path(spec["result"]).is_file():
        tail = log.read_text().strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}; see {log}: " + " | ".join(tail), "wall_s": wall}
    return {**json.loads(Path(spec["result"]).read_text()), "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sort,copy,add")
    p.add_argument("--methods", default="kto,apo,dpo")
    p.add_argument("--betas", default="0.1,0.5")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--completions", type=int, default=8, help="completions per optimizer step (even)")
    p.add_argument("--train-prompts", type=int, default=5000)
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--init", choices=("sft", "random"), default="sft",
                   help="sft: every run starts from a short SFT of the random-init model (the paper's pipeline); "
                   "random: from the random-init model itself")
    p.add_argument("--sft-prompts", type=int, default=2000, help="prompts of the SFT start (their correct answers)")
    p.add_argument("--sft-steps", default="sort=300,copy=1500,add=2500",
                   help="SFT steps per task (task=N,...), or one number for every task")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--out", default="outputs/quality_bench")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # a subprocess of this tool: it ends without the interpreter's teardown
        from megakto.distributed import comm

        comm.run_rank(lambda: worker(args.worker))
    if args.completions < 2 or args.completions % 2:
        raise SystemExit("error: --completions must be even (DPO takes them as pairs)")
    tasks = [t for t in args.tasks.split(",") if t]
    betas = [float(b) for b in args.betas.split(",") if b]
    methods = {m: parse_method(m, args.lr) for m in args.methods.split(",") if m}
    if "dpo" in [m["kind"] for m in methods.values()]:
        try:
            importlib.import_module("trl")
        except Exception as err:
            raise SystemExit(f"error: the dpo runs need TRL ({err.__class__.__name__}: {err}): pip install "
                             "trl==1.16.0, or leave dpo out of --methods")

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_dir = out / f"tiny-model-h{args.hidden_size}-l{args.num_layers}"
    if not (init_dir / "config.json").is_file():
        from megakto._demo.tiny_model import make_tiny_model

        make_tiny_model(init_dir, hidden_size=args.hidden_size, num_layers=args.num_layers,
                        intermediate_size=2 * args.hidden_size, seed=args.seed)
    data = {t: write_task_data(t, out / "data" / t, args.train_prompts, args.eval_prompts, args.sft_prompts, args.seed)
            for t in tasks}
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    common = {"completions": args.completions, "eval_every": args.eval_every, "seed": args.seed, "beta": 0.1,
              "prompts": [args.train_prompts, args.eval_prompts, args.sft_prompts]}
    start = time.perf_counter()
    # 1. The starting point of every run of a task (policy and reference alike): a short SFT.
    sft_steps = _per_task(args.sft_steps, tasks)
    sft_specs = [{**common, "name": f"{t}-sft", "task": t, "method": {"kind": "sft"}, "init_dir": str(init_dir),
                  "data": data[t], "steps": sft_steps[t], "lr": args.sft_lr, "out_dir": str(runs / f"{t}-sft"),
                  "result": str(runs / f"{t}-sft.result.json"), "model": [args.hidden_size, args.num_layers]}
                 for t in tasks]
    if args.init == "random":
        bases = {t: {"model_dir": str(init_dir), "pass_rate": None} for t in tasks}
    else:
        with ThreadPoolExecutor(args.jobs) as pool:  # the same SFT as last time in this --out: reused
            bases = dict(zip(tasks, pool.map(lambda s: _run_one(s, runs, reuse=True), sft_specs)))
    for t, base in bases.items():
        if "error" in base:
            raise SystemExit(f"error: the SFT start of task {t} failed: {base['error']}")
    # 2. The runs.
    specs = []
    for t in tasks:
        for beta in betas:
            for label, m in methods.items():
                name = f"{t}-{label}-b{beta}".replace("@", "_").replace("=", "-").replace("/", "_")
                specs.append({**common, "name": name, "task": t, "label": label, "beta": beta, "method": m,
                              "model_dir": bases[t]["model_dir"], "data": data[t], "steps": args.steps,
                              "out_dir": str(runs / name), "result": str(runs / f"{name}.result.json")})
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda s: _run_one(s, runs), specs))
    wall = time.perf_counter() - start
    report = {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "wall_s": wall,
              "machine": machine_info(threads=1),
              "sft_pass_rate": {t: b["pass_rate"] for t, b in bases.items()},
              "runs": [{**{k: s[k] for k in ("name", "task", "label", "beta")}, **r} for s, r in zip(specs, results)]}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    machine = report["machine"]
    print(f"\nmachine: {machine['cpu_model']}, {machine['cpus_usable']} usable cores; torch "
          f"{machine['versions']['torch']}, trl {machine['versions']['trl']}")
    print_table(report, tasks, betas, list(methods))
    plot(report, out / "curves.png", tasks, betas)
    plot_mechanism(report, out / "mechanism.png", tasks, betas)
    print(f"\n{len(specs)} runs in {wall / 60:.1f} min; {out / 'results.json'}, {out / 'curves.png'}, "
          f"{out / 'mechanism.png'}")
    return 0


def _per_task(value: str, tasks: list[str]) -> dict[str, int]:
    if "=" not in value:
        return {t: int(value) for t in tasks}
    given = dict(item.split("=") for item in value.split(","))
    missing = [t for t in tasks if t not in given]
    if missing:
        raise SystemExit(f"error: --sft-steps names no steps for {', '.join(missing)}")
    return {t: int(given[t]) for t in tasks}


if __name__ == "__main__":
    sys.exit(main())
