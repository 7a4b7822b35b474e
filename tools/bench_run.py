#!/usr/bin/env python
"""The whole run, not only the step: start-up, first step, steady-state step and evaluation time per
system, and each figure's ratio against a committed baseline.

    python tools/bench_run.py [--systems demo,tiny256] [--steps 20] [--eval-every 10] [--nproc 2] \
        [--port 29910] [--baseline tools/bench_run_baseline.json] [--json out.json] [--workdir outputs/bench_run]

Each system is a real run of ``launch/train_kto.py`` under the deepspeed launcher (``--nproc`` CPU
ranks, ZeRO-3 policy, the reference offloaded to CPU: the quickstart's command) on the sorting demo
data, with ``--steps`` steps and an evaluation every ``--eval-every``:

* ``demo``: the quickstart's tiny model (hidden 64, 2 layers, vocabulary 512) and configs/tiny_demo.yaml
  (eval samples asked for);
* ``tiny256``: a larger tiny Llama (hidden 256, 4 layers, vocabulary 32,000), eval samples as the
  planner decides by default;
* ``tiny256-samples``: the same with ``train.eval_samples=3``, to show what the samples cost there.

The figures come from the run's own log: the start-up phases line, the steps line (first step and
the mean of the others), each evaluation's line (its time and its samples'), the final phase and
the launcher's wall time. ``--baseline`` (a JSON of the same figures, committed with the README's)
gives the ratio now / baseline of each, so a change that slows any phase shows up as a number in
review. Other work on the machine moves every figure (10-30 % on a shared 2-core machine): compare
runs made in the same sitting. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from _launch import rank_env  # noqa: E402

FIGURES = ("startup_s", "first_step_s", "step_s", "eval_s", "samples_s", "final_s", "wall_s")
SYSTEMS = {
    "demo": {"model": [], "overrides": []},
    "tiny256": {"model": ["--hidden-size", "256", "--num-layers", "4", "--num-heads", "4", "--num-kv-heads", "2",
                          "--intermediate-size", "688", "--vocab-size", "32000"],
                "overrides": ["train.eval_samples=null"]},
    "tiny256-samples": {"model": "tiny256", "overrides": ["train.eval_samples=3"]},
}
_NUM = r"([0-9.]+)"


def parse_log(text: str) -> dict[str, float | None]:
    """The figures of one run's log (None where the log has no such line)."""
    out: dict[str, float | None] = dict.fromkeys(FIGURES)
    m = re.search(rf"start-up {_NUM} s:", text)
    if m:
        out["startup_s"] = float(m.group(1))
    m = re.search(rf"steps: \d+ in {_NUM} s: the first {_NUM} s(?:, then {_NUM} s each)?", text)
    if m:
        out["first_step_s"] = float(m.group(2))
        out["step_s"] = float(m.group(3)) if m.group(3) else None
    evals = re.findall(rf"evaluation at step \d+: {_NUM} s(?:, samples {_NUM} s)?", text)
    if evals:
        out["eval_s"] = sum(float(e) for e, _ in evals) / len(evals)
        samples = [float(s) for _, s in evals if s]
        out["samples_s"] = sum(samples) / len(samples) if samples else None
    m = re.search(rf"final phase {_NUM} s:", text)
    if m:
        out["final_s"] = float(m.group(1))
    return out


def ratios(now: dict, baseline: dict) -> dict[str, float | None]:
    """now / baseline for each figure both have (None where either lacks it or the baseline is 0)."""
    return {k: (now[k] / baseline[k] if now.get(k) is not None and baseline.get(k) else None) for k in FIGURES}


def table(results: dict[str, dict], baselines: dict[str, dict]) -> str:
    head = f"{'system':<18}" + "".join(f"{k:>16}" for k in FIGURES)
    lines = [head]
    for name, figs in results.items():
        lines.append(f"{name:<18}" + "".join(f"{_cell(figs.get(k)):>16}" for k in FIGURES))
        if name in baselines:
            r = ratios(figs, baselines[name])
            lines.append(f"{'  x baseline':<18}" + "".join(f"{_cell(r[k], 'x'):>16}" for k in FIGURES))
    return "\n".join(lines)


def _cell(v, unit: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def _prepare(name: str, work: Path) -> Path:
    """The system's model folder (made once) and the demo data."""
    spec = SYSTEMS[name]
    model_name = spec["model"] if isinstance(spec["model"], str) else name
    model_args = SYSTEMS[model_name]["model"]
    model = work / f"model-{model_name}"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "tools/make_tiny_model.py"), str(model), *model_args], check=True,
                       stdout=subprocess.DEVNULL)
    if not (work / "data" / "train.jsonl").exists():
        subprocess.run([sys.executable, str(REPO / "tools/make_demo_data.py"), str(work / "data")], check=True,
                       stdout=subprocess.DEVNULL)
    return model


def run_system(name: str, args) -> dict:
    work = Path(args.workdir)
    model = _prepare(name, work)
    out_dir = work / f"out-{name}"
    overrides = [f"model.path={model}", f"data.train_files={work / 'data/train.jsonl'}",
                 f"data.eval_files={work / 'data/eval.jsonl'}", f"output_dir={out_dir}",
                 f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}", *SYSTEMS[name]["overrides"]]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc), "--master_port",
           str(args.port), "launch/train_kto.py", "--config", "configs/tiny_demo.yaml", "--deepspeed",
           "ds_configs/zero3.json", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True)
    wall = time.perf_counter() - start
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{name}: the run failed (exit {proc.returncode}); see {work / f'{name}.log'}")
    figs = parse_log(proc.stdout)
    figs["wall_s"] = wall
    return figs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, what in (("--systems", ",".join(SYSTEMS), "comma-separated, of: " + ", ".join(SYSTEMS)),
                                ("--steps", 20, "optimizer steps per run"),
                                ("--eval-every", 10, "steps between evaluations"),
                                ("--nproc", 2, "CPU ranks"), ("--port", 29910, "the launcher's --master_port"),
                                ("--baseline", str(REPO / "tools/bench_run_baseline.json"), "figures to divide by"),
                                ("--json", None, "write the figures here (a baseline file's format)"),
                                ("--workdir", "outputs/bench_run", "models, data, run folders and logs")):
        parser.add_argument(flag, default=default, type=type(default) if default is not None else str, help=what)
    args = parser.parse_args(argv)
    names = args.systems.split(",")
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    os.makedirs(args.workdir, exist_ok=True)
    baselines = {}
    if args.baseline and os.path.exists(args.baseline):
        with open(args.baseline) as fh:
            baselines = json.load(fh)["systems"]
    results = {name: run_system(name, args) for name in names}
    print(f"{args.nproc} CPU ranks, {args.steps} steps, an evaluation every {args.eval_every}; seconds; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(table(results, baselines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": {"steps": args.steps, "eval_every": args.eval_every, "nproc": args.nproc},
                       "systems": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
