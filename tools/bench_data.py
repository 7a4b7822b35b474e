#!/usr/bin/env python
"""Start-up time and memory per rank at dataset scale, for the online and the cached reference.

    python tools/bench_data.py [--rows 1000000] [--prompt-tokens 50 500] [--completion-tokens 50 500] \
        [--modes online,cache] [--nproc 2] [--workdir outputs/bench_data] [--json bench_data.json]

It writes ``--rows`` KTO rows (and an eval file of ``--eval-rows``) with the word-level tokenizer
of tools/_bench_workload.py, so a prompt of P tokens is exactly P - 1 words plus BOS and a
completion of C tokens C - 1 words plus EOS, lengths uniform in the given ranges, half desirable;
then starts megakto on ``--nproc`` CPU ranks under the deepspeed launcher for each run below, in a
process of its own: the trainer is built (every start-up phase) and one optimizer step taken.

* ``online cold``: a fresh ``datasets`` cache: JSON -> Arrow, tokenization (``data.num_proc``
  auto), then the policy and the offloaded ZeRO-3 reference;
* ``online warm``: the same again: ``datasets`` reuses the Arrow table and the tokenized map;
* ``cache fill``: ``ref.mode=cache`` into an empty cache: keys of every train and eval sequence
  (targets and KL rows), rank 0's missing list, each rank reading its own share of the missing
  rows batch by batch and writing its shard. The bench's scorer returns a placeholder per sequence
  (-length) instead of running the reference model: two million reference forwards of ~550
  tokens are hours on a CPU, and the forwards are the same code at any dataset size (see
  tests/e2e/test_modes.py for real ones). Everything else is the trainer's own path;
* ``cache warm``: ``ref.mode=cache`` again: every key is found, the reference is never loaded.

Each run is repeated on a file of ``--baseline-rows`` rows; the difference of the two peaks is
the memory that grows with the data ("beyond baseline"), for the largest rank. Two peaks per rank
process: anonymous memory (RssAnon, sampled every 10 ms: the process's own memory, without the
file-backed pages of the memory-mapped Arrow tables, which the kernel may drop at any time), and
the kernel's VmHWM (everything resident, those pages included once read). Tokenizer worker
processes (``data.num_proc`` > 1) are separate processes and not counted. Times are rank 0's start-up phases (KTOTrainer.phases) and the first step's wall time.
Other work on the machine slows every time figure; the load average is printed with them.
Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from _bench_workload import SPECIALS, write_model  # noqa: E402
from _launch import launcher_command, rank_env  # noqa: E402
from _bench_measure import read_status as _status  # noqa: E402  (a kB field of /proc/self/status, in bytes)

MIB = 1 << 20
VOCAB = 1000
RUNS = {  # name -> (ref.mode, the bench's placeholder scorer, a fresh datasets cache)
    "online cold": ("online", False, True),
    "online warm": ("online", False, False),
    "cache fill": ("cache", True, False),
    "cache warm": ("cache", False, False),
}


# ---------------------------------------------------------------------------------------------
# Data


def write_rows(path: Path, n_rows: int, *, prompt_tokens: tuple[int, int], completion_tokens: tuple[int, int],
               seed: int, chunk: int = 20_000) -> int:
    """``n_rows`` JSON lines of random words, streamed in chunks (a million rows never sit in
    memory); returns the target tokens written (completion words + EOS, over all rows)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(len(SPECIALS), VOCAB)], dtype=object)
    total = 0
    with open(path, "w", encoding="utf-8") as fh:
        for start in range(0, n_rows, chunk):
            m = min(chunk, n_rows - start)
            p_len = rng.integers(prompt_tokens[0] - 1, prompt_tokens[1], size=m)  # words; + BOS
            c_len = rng.integers(completion_tokens[0] - 1, completion_tokens[1], size=m)  # words; + EOS
            ids = rng.integers(0, len(words), size=int(p_len.sum() + c_len.sum()))
            labels = rng.random(m) < 0.5
            at = 0
            lines = []
            for p, c, label in zip(p_len, c_len, labels):
                prompt = " ".join(words[ids[at:at + p]])
                completion = " " + " ".join(words[ids[at + p:at + p + c]])
                at += p + c
                lines.append(json.dumps({"prompt": prompt, "completion": completion, "label": bool(label)}))
            fh.write("\n".join(lines) + "\n")
            total += int(c_len.sum()) + m
    return total


# ---------------------------------------------------------------------------------------------
# One run (inside each rank)


class _Placeholder:
    """The "cache fill" run's reference scorer: -length per sequence, no model."""

    precompute_seconds = 0.0

    def logps(self, pairs):
        import torch

        return torch.tensor([-float(len(p) + len(c)) for p, c in pairs], dtype=torch.float64)


class _AnonPeak:
    """The largest RssAnon seen by a thread reading it every ``interval`` s: the process's own
    memory, without the file-backed pages of the memory-mapped Arrow tables (which count in VmHWM
    once read, and which the kernel reclaims under pressure). A spike shorter than the interval
    can be missed."""

    def __init__(self, interval: float = 0.01):
        import threading

        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status("RssAnon"))


def worker(spec_path: str, result_dir: str) -> int:
    from megakto.config import load_config
    from megakto.distributed import comm
    from megakto.trainer import KTOTrainer

    spec = json.loads(Path(spec_path).read_text())

    class Trainer(KTOTrainer):
        def _setup_reference(self):
            if not spec["placeholder"]:
                return super()._setup_reference()
            from megakto.reference.build import build_reference

            cfg = self.cfg
            return build_reference(cfg.ref, cfg.model, dtype=self._model_dtype(), online=_Placeholder,
                                   sequences=self._reference_sequences, batch_size=cfg.train.eval_batch_size,
                                   dp_rank=self.dims.dp_rank, dp_size=self.dims.dp, dp_group=self.dims.dp_group,
                                   device=self.device, log=self.log.info)

    anon = _AnonPeak()
    start = time.perf_counter()
    trainer = Trainer(load_config(None, spec["overrides"]), spec["deepspeed"])
    built = time.perf_counter()
    trainer.next_step()
    stepped = time.perf_counter()
    out = {"rank": comm.rank(), "peak_rss": _status("VmHWM"), "peak_anon": anon.stop(),
           "rss_file_end": _status("RssFile"), "startup_s": built - start, "first_step_s": stepped - built,
           "phases": trainer.phases.seconds, "train_rows": len(trainer.train_rows)}
    Path(result_dir, f"rank{comm.rank()}.json").write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------
# The driver


def run_one(name: str, data: dict, work: Path, nproc: int, timeout: float) -> dict:
    mode, placeholder, cold = RUNS[name]
    tag = f"{data['tag']}-{name.replace(' ', '-')}"
    result_dir = work / f"result-{tag}"
    shutil.rmtree(result_dir, ignore_errors=True)
    result_dir.mkdir(parents=True)
    hf_cache = work / f"hf-cache-{data['tag']}"
    if cold:
        shutil.rmtree(hf_cache, ignore_errors=True)
    cache_dir = work / f"ref-cache-{data['tag']}"
    if placeholder:
        shutil.rmtree(cache_dir, ignore_errors=True)
    overrides = [f"model.path={work / 'model'}", f"data.train_files=[{data['train']}]",
                 f"data.eval_files=[{data['eval']}]", "data.max_length=1024", "train.max_steps=1",
                 "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_every=0",
                 "train.eval_samples=0", "train.health_checks=false", f"output_dir={work / ('out-' + tag)}",
                 f"ref.mode={mode}", f"ref.cache_dir={cache_dir}", "ref.offload=cpu", "train.eval_batch_size=64"]
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps({"overrides": overrides, "deepspeed": str(REPO / "ds_configs/zero3.json"),
                                     "placeholder": placeholder}))
    cmd = launcher_command(str(Path(__file__).resolve()), ["--worker", str(spec_path), str(result_dir)], nproc=nproc)
    env = rank_env({"HF_DATASETS_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
                    "PYTHONPATH": str(REPO)})
    log = work / f"{tag}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank*.json"))]
    if rc != 0 or len(ranks) != nproc:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["?"]
        return {"ok": False, "error": f"exit {rc}: {tail[0][:300]}", "log": str(log)}
    first = next(r for r in ranks if r["rank"] == 0)
    return {"ok": True, "wall_s": wall, "startup_s": first["startup_s"], "first_step_s": first["first_step_s"],
            "phases": first["phases"], "peak_rss_mib": [r["peak_rss"] / MIB for r in ranks],
            "peak_anon_mib": [r["peak_anon"] / MIB for r in ranks],
            "rss_file_end_mib": [r["rss_file_end"] / MIB for r in ranks],
            "train_rows": first["train_rows"], "loadavg_1min": os.getloadavg()[0], "log": str(log)}


def summarize(results: dict) -> dict:
    """Per run: the largest rank's peak beyond the baseline run's largest rank, and the warm/cold ratio."""
    out = {}
    for name in RUNS:
        big, base = results["data"].get(name), results["baseline"].get(name)
        if not big or not big.get("ok"):
            continue
        row = {"startup_s": big["startup_s"], "first_step_s": big["first_step_s"], "phases": big["phases"],
               "peak_rss_mib": max(big["peak_rss_mib"]), "peak_anon_mib": max(big["peak_anon_mib"])}
        if base and base.get("ok"):
            for key in ("peak_rss_mib", "peak_anon_mib"):
                row[f"baseline_{key}"] = max(base[key])
                row[f"{key[:-4]}_beyond_baseline_mib"] = max(big[key]) - max(base[key])
        out[name] = row
    cold, warm = out.get("online cold"), out.get("online warm")
    if cold and warm:
        out["second start-up speed-up"] = cold["startup_s"] / warm["startup_s"]
    return out


def markdown(summary: dict, rows: int, names: list[str]) -> str:
    nan = float("nan")
    lines = [f"| run ({rows:,} rows) | start-up s | of it: data s | reference s | first step s | peak anon/rank MiB "
             f"| anon beyond baseline MiB | peak RSS (VmHWM)/rank MiB | RSS beyond baseline MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = summary.get(name)
        if r is None:
            lines.append(f"| {name} | failed | | | | | | | |")
            continue
        lines.append(f"| {name} | {r['startup_s']:.1f} | {r['phases'].get('data', 0):.1f} | "
                     f"{r['phases'].get('reference', 0):.1f} | {r['first_step_s']:.1f} | {r['peak_anon_mib']:.0f} | "
                     f"{r.get('peak_anon_beyond_baseline_mib', nan):.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r.get('peak_rss_beyond_baseline_mib', nan):.0f} |")
    if "second start-up speed-up" in summary:
        lines.append(f"\nsecond start-up on the same data: {summary['second start-up speed-up']:.1f}x faster")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows")
    parser.add_argument("--eval-rows", type=int, default=2000, help="held-out rows (the evaluator is set up, not run)")
    parser.add_argument("--baseline-rows", type=int, default=1000, help="rows of the baseline runs")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(50, 500), metavar=("MIN", "MAX"))
    parser.add_argument("--completion-tokens", type=int, nargs=2, default=(50, 500), metavar=("MIN", "MAX"))
    parser.add_argument("--modes", default="online,cache", help="online, cache or both")
    parser.add_argument("--nproc", type=int, default=2, help="ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="outputs/bench_data")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args(argv)
    if args.worker:  # a subprocess of this tool: it ends without the interpreter's teardown
        from megakto.distributed import comm

        comm.run_rank(lambda: worker(*args.worker))
    modes = {m.strip() for m in args.modes.split(",")}
    if not modes <= {"online", "cache"} or args.rows < 8 or args.baseline_rows < 8:
        parser.error("--modes takes online and/or cache; --rows and --baseline-rows need at least 8 (one batch)")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    longest = args.prompt_tokens[1] + args.completion_tokens[1]
    write_model(work / "model", vocab_size=VOCAB, seed=args.seed, longest=longest, hidden_size=64, num_layers=2,
                num_heads=4, intermediate_size=128)
    sets = {}
    for tag, n in (("data", args.rows), ("baseline", args.baseline_rows)):
        start = time.perf_counter()
        paths = {}
        for split, m, seed in (("train", n, args.seed), ("eval", min(args.eval_rows, n), args.seed + 1)):
            paths[split] = work / f"{tag}-{n}-{split}.jsonl"
            params = {"rows": m, "prompt_tokens": list(args.prompt_tokens),
                      "completion_tokens": list(args.completion_tokens), "seed": seed}
            made = paths[split].with_suffix(".params.json")
            # The same file again (not rewritten): datasets keys its cache by the file's path and
            # modification time, so a rewrite would make every run's start-up a first one.
            if not (paths[split].exists() and made.exists() and json.loads(made.read_text()) == params):
                write_rows(paths[split], m, prompt_tokens=tuple(args.prompt_tokens),
                           completion_tokens=tuple(args.completion_tokens), seed=seed)
                made.write_text(json.dumps(params))
        print(f"rows ready in {paths['train']} ({time.perf_counter() - start:.0f} s)", flush=True)
        sets[tag] = {"tag": f"{tag}-{n}", **{k: str(v) for k, v in paths.items()}}
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
               "rows": args.rows, "baseline_rows": args.baseline_rows, "nproc": args.nproc,
               "prompt_tokens": list(args.prompt_tokens), "completion_tokens": list(args.completion_tokens),
               "data": {}, "baseline": {}}
    names = [n for n in RUNS if RUNS[n][0] in modes]
    for tag in ("baseline", "data"):
        for name in names:
            r = run_one(name, sets[tag], work, args.nproc, args.timeout)
            results[tag][name] = r
            state = (f"start-up {r['startup_s']:.1f} s, first step {r['first_step_s']:.1f} s, peak RSS/rank "
                     f"{max(r['peak_rss_mib']):.0f} MiB" if r["ok"] else r["error"])
            print(f"{tag} {name}: {state}", flush=True)
    results["summary"] = summarize(results)
    print(markdown(results["summary"], args.rows, names))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
