#!/usr/bin/env python
"""megakto's vocabulary-parallel log-probs next to DeepSpeed's own, on the tensor-parallel path.

    python tools/bench_vocab_parallel.py [--sizes 256x32000x2048,1024x152064x2048] \
        [--dtypes float32,bfloat16] [--tp 1,2] [--repeats 1] [--threads 1] [--json out.json]

Three implementations of the per-token log-probs of a bias-free output head, each as the TP path
would call it (hidden states identical on every rank, each rank holding V/tp rows of the head):

* ``megakto``: :func:`megakto.kto.chunked_logps.token_logps` with the group's reducers, chunked as
  :mod:`megakto.model.forward` chunks it (``chunk_tokens_for`` of the rank's rows);
* ``ds-fused``: DeepSpeed's ``vocab_parallel_linear_cross_entropy(reduction="none")``, negated;
* ``ds-logits``: the head's whole (N, V/tp) logits, then DeepSpeed's ``vocab_parallel_logprobs``.

A size is ``HxVxN`` (hidden, vocabulary, scored tokens). For each, one fp64 reference in this
process; then per ``--tp`` degree one run under the deepspeed launcher (``--threads`` torch threads
per rank), every implementation and dtype in it; what each rank measures is said in
tools/_vocab_bench.py. Figures only; nothing is asserted (the numerics are pinned by
tests/distributed/test_vocab_parallel_deepspeed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import torch  # noqa: E402

from _bench_measure import machine_info  # noqa: E402
from _launch import launcher_command, rank_env  # noqa: E402
from _vocab_bench import DTYPES, IMPLS, make_case, measure_rank, reference  # noqa: E402

MIB = 1 << 20


def rank_main(workdir: Path, sizes: list[str], dtypes: list[str], repeats: int) -> int:
    """One rank: every case, implementation and dtype on this rank's rows; writes rank<R>.json."""
    from megakto.distributed import comm, engine
    from megakto.distributed.vocab_parallel import group_reducers, vocab_shard_range
    from megakto.kto.chunked_logps import token_logps
    from megakto.model.forward import chunk_tokens_for

    engine.init_distributed(timeout_minutes=30)
    group = comm.world_group()
    reduce_max, reduce_sum = group_reducers(group)
    results = []
    for i, size in enumerate(sizes):
        vocab = int(size.split("x")[1])
        start, end = vocab_shard_range(vocab, group)
        fns = {
            "megakto": lambda h, w, t: token_logps(h, w, t, chunk_size=chunk_tokens_for(w.shape[0]),
                                                   vocab_start=start, reduce_max=reduce_max, reduce_sum=reduce_sum),
            "ds-fused": lambda h, w, t: engine.deepspeed_token_logps(h, w, t, op="fused", vocab_start=start,
                                                                     group=group),
            "ds-logits": lambda h, w, t: engine.deepspeed_token_logps(h, w, t, op="logits", vocab_start=start,
                                                                      group=group),
        }
        for figures in measure_rank(workdir / f"case{i}.pt", workdir / f"ref{i}.pt", fns, start, end, dtypes,
                                    repeats, lambda: comm.barrier(group=group)):
            results.append({"size": size, **figures})
    (workdir / f"rank{comm.rank()}.json").write_text(json.dumps(results))
    return 0


def _combine(ranks: list[list[dict]]) -> list[dict]:
    """Rank results -> one row per (size, impl, dtype): errors over all ranks' elements, the slowest
    rank's time, the largest rank's peak."""
    rows = []
    for per_rank in zip(*ranks):
        row = {k: per_rank[0][k] for k in ("size", "impl", "dtype")}
        for key in ("logps", "grad_hidden", "grad_weight"):
            parts = [r[key] for r in per_rank]
            row[key] = {"max": max(p["max"] for p in parts),
                        "mean": sum(p["sum"] for p in parts) / sum(p["count"] for p in parts)}
        row["seconds"] = max(r["seconds"] for r in per_rank)
        row["peak_mib"] = max(r["peak_bytes"] for r in per_rank) / MIB
        rows.append(row)
    return rows


def report(rows: list[dict], scales: dict) -> str:
    """A markdown table per size and TP degree, with memory and time as ratios to megakto's."""
    lines = []
    for (size, tp), group in _grouped(rows).items():
        h, v, n = size.split("x")
        lines += ["", f"H={h} V={v} N={n}, TP{tp} (reference: max |logp| {scales[size][0]:.1f}, max |dL/dh| "
                      f"{scales[size][1]:.3g}, max |dL/dW| {scales[size][2]:.3g})", "",
                  "| dtype | impl | logp err max / mean | dL/dh err max / mean | dL/dW err max / mean "
                  "| peak MiB | x megakto | fwd+bwd s | x megakto |", "|" + "---|" * 9]
        base = {r["dtype"]: r for r in group if r["impl"] == "megakto"}
        for r in group:
            b = base.get(r["dtype"], r)
            errs = " | ".join(f"{r[k]['max']:.2e} / {r[k]['mean']:.2e}"
                              for k in ("logps", "grad_hidden", "grad_weight"))
            lines.append(f"| {r['dtype']} | {r['impl']} | {errs} | {r['peak_mib']:.0f} | "
                         f"{r['peak_mib'] / b['peak_mib']:.2f} | {r['seconds']:.2f} | "
                         f"{r['seconds'] / b['seconds']:.2f} |")
    return "\n".join(lines)


def _grouped(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        out.setdefault((r["size"], r["tp"]), []).append(r)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256x32000x2048,256x32000x8192,1024x32000x4096,1024x152064x2048",
                        help="comma-separated HxVxN: hidden size, vocabulary, scored tokens")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {list(DTYPES)}")
    parser.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel degrees (ranks per run)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the first (the fastest is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", metavar="OUT", help="write every figure and the machine info here")
    parser.add_argument("--rank-worker", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args(argv)
    sizes, dtypes = args.sizes.split(","), args.dtypes.split(",")
    if args.rank_worker:  # a subprocess of this tool: it ends without the interpreter's teardown
        from megakto.distributed import comm

        comm.run_rank(lambda: rank_main(Path(args.rank_worker), sizes, dtypes, args.repeats))

    rows, scales = [], {}
    with tempfile.TemporaryDirectory(prefix="megakto-vocab-bench-") as tmp:
        workdir = Path(tmp)
        for i, size in enumerate(sizes):
            case = make_case(*(int(x) for x in size.split("x")))
            ref = reference(case)
            scales[size] = [ref[k].abs().max().item() for k in ("logps", "grad_hidden", "grad_weight")]
            torch.save(case, workdir / f"case{i}.pt")
            torch.save(ref, workdir / f"ref{i}.pt")
            del case, ref
        for tp in (int(x) for x in args.tp.split(",")):
            cmd = launcher_command(str(Path(__file__).resolve()),
                                   ["--rank-worker", tmp, "--sizes", args.sizes, "--dtypes", args.dtypes,
                                    "--repeats", str(args.repeats)], nproc=tp)
            env = rank_env({"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"TP{tp} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            rows += [{**r, "tp": tp} for r in _combine([json.loads((workdir / f"rank{r}.json").read_text())
                                                        for r in range(tp)])]
            for r in range(tp):
                os.remove(workdir / f"rank{r}.json")
    machine = {**machine_info(args.threads), "loadavg_1min_after": os.getloadavg()[0]}
    print(f"{machine['cpu_model']}, {machine['cpus_usable']} usable cores, {args.threads} thread(s) per rank, "
          f"torch {machine['versions']['torch']}, deepspeed {machine['versions']['deepspeed']}; "
          f"implementations: {', '.join(IMPLS)}")
    print(report(rows, scales))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "scales": scales, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
