#!/usr/bin/env python
"""Throughput and memory of megakto's KTO, next to SFT on the same engine and TRL's KTOTrainer.

    python tools/bench.py [--systems megakto-kto,trl-kto,...] [--steps 6] [--warmup 2] \
        [--batch 8] [--vocab 32000] [--tp 2] [--pp 2] [--lora 16] [--json bench.json] \
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
import ctypes
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from _bench_workload import add_model_args, model_shape, write_workload  # noqa: E402
from _launch import free_port, launcher_command  # noqa: E402

MIB = 1 << 20

# name -> how it runs. "ref" is megakto's ref.mode; TRL's precompute drops the reference model
# (ref_model=None), which is what TRL's precompute_ref_log_probs is for.
SYSTEMS = {
    "megakto-kto": {"kind": "megakto", "loss_type": "kto", "ref": "online"},
    "megakto-kto-cached": {"kind": "megakto", "loss_type": "kto", "ref": "cache"},
    "megakto-sft": {"kind": "megakto", "loss_type": "sft", "ref": "online"},
    "trl-kto": {"kind": "trl", "precompute": False},
    "trl-kto-precomputed": {"kind": "trl", "precompute": True},
}

# (label, numerator, denominator, figure)
RATIOS = [
    ("megakto KTO / megakto SFT, tokens/s", "megakto-kto", "megakto-sft", "tokens_per_s"),
    ("megakto KTO cached / megakto SFT, tokens/s", "megakto-kto-cached", "megakto-sft", "tokens_per_s"),
    ("megakto KTO cached / megakto SFT, tokens/s incl. precompute", "megakto-kto-cached", "megakto-sft",
     "tokens_per_s_incl_precompute"),
    ("megakto KTO / TRL KTO (online), tokens/s", "megakto-kto", "trl-kto", "tokens_per_s"),
    ("megakto KTO cached / TRL KTO precomputed, tokens/s", "megakto-kto-cached", "trl-kto-precomputed",
     "tokens_per_s"),
    ("megakto KTO cached / TRL KTO precomputed, tokens/s incl. precompute", "megakto-kto-cached",
     "trl-kto-precomputed", "tokens_per_s_incl_precompute"),
    ("megakto KTO / TRL KTO (online), tokens per CPU second", "megakto-kto", "trl-kto", "tokens_per_cpu_s"),
    ("megakto KTO cached / TRL KTO precomputed, tokens per CPU second", "megakto-kto-cached",
     "trl-kto-precomputed", "tokens_per_cpu_s"),
    ("megakto KTO / TRL KTO (online), peak beyond setup", "megakto-kto", "trl-kto", "peak_beyond_setup_mib"),
    ("megakto KTO cached / TRL KTO precomputed, peak beyond setup", "megakto-kto-cached",
     "trl-kto-precomputed", "peak_beyond_setup_mib"),
    ("megakto KTO / TRL KTO (online), peak beyond warm state", "megakto-kto", "trl-kto", "peak_beyond_warm_mib"),
    ("megakto KTO / TRL KTO (online), peak RSS", "megakto-kto", "trl-kto", "peak_rss_mib"),
    ("megakto KTO cached / TRL KTO precomputed, peak RSS", "megakto-kto-cached", "trl-kto-precomputed",
     "peak_rss_mib"),
    ("megakto KTO / megakto SFT, peak GPU memory", "megakto-kto", "megakto-sft", "peak_gpu_mib"),
    ("megakto KTO / TRL KTO (online), peak GPU memory", "megakto-kto", "trl-kto", "peak_gpu_mib"),
    ("megakto KTO cached / TRL KTO precomputed, peak GPU memory", "megakto-kto-cached", "trl-kto-precomputed",
     "peak_gpu_mib"),
]

COLUMNS = [  # (header, key, format)
    ("system", "system", "{}"),
    ("target tokens/s", "tokens_per_s", "{:.0f}"),
    ("samples/s", "samples_per_s", "{:.2f}"),
    ("s/step", "seconds_per_step", "{:.2f}"),
    ("CPU s/step", "cpu_s_per_step", "{:.2f}"),
    ("precompute s", "precompute_s", "{:.1f}"),
    ("tokens/s incl. precompute", "tokens_per_s_incl_precompute", "{:.0f}"),
    ("setup s", "setup_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("peak beyond setup MiB", "peak_beyond_setup_mib", "{:.0f}"),
    ("peak beyond warm state MiB", "peak_beyond_warm_mib", "{:.0f}"),
]
GPU_COLUMNS = [  # shown when some system ran on a GPU
    ("peak GPU MiB", "peak_gpu_mib", "{:.0f}"),
    ("peak GPU reserved MiB", "peak_gpu_reserved_mib", "{:.0f}"),
]


# ---------------------------------------------------------------------------------------------
# Measurement (runs inside each worker)


def _read_status(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the
    RSS taken after the warmup steps is the live state (weights, optimizer states, whatever the
    trainer keeps between steps) and not the allocator's cache of freed activations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak resident memory since the last :meth:`mark`.

    The kernel's own peak (VmHWM, reset through /proc/self/clear_refs) is exact and costs nothing.
    A sampling thread is the fallback where the reset is not allowed, or on request: on a 2-core
    machine a thread waking every 5 ms next to 2 torch threads slowed TRL's step 2.3x (78 s against
    33 s for 3 steps), so it is off by default and its use is recorded with the figures.
    """

    def __init__(self, interval: float = 0.0):
        self.hwm = _reset_hwm()
        self.interval = interval if interval > 0 or self.hwm else 0.005
        self.sampled = 0
        self._stop = threading.Event()
        self._thread = None
        if self.interval > 0:
            self.sampled = _read_status("VmRSS")
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, _read_status("VmRSS"))

    def mark(self) -> int:
        """Current RSS, which also becomes the peak (the next window starts here)."""
        if self.hwm:
            _reset_hwm()
        now = _read_status("VmRSS")
        self.sampled = now
        return now

    def peak(self) -> dict:
        """Peak since the last mark, in bytes, by each method in use; stops the sampler."""
        out = {}
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            out["sampled"] = max(self.sampled, _read_status("VmRSS"))
        if self.hwm:
            out["vmhwm"] = _read_status("VmHWM")
        return out

    def describe(self) -> str:
        parts = ["VmHWM reset after setup"] if self.hwm else []
        if self._thread is not None:
            parts.append(f"VmRSS sampled every {self.interval * 1000:g} ms")
        return " + ".join(parts)


class _Clock:
    """Step-end times and per-step target tokens/rows; the timed window starts after ``warmup``."""

    def __init__(self, warmup: int, rss: PeakRss):
        self.warmup, self.rss = warmup, rss
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.rows: list[int] = []
        self.cpu: list[float] = []
        self.warm_rss = 0

    def step_done(self, tokens: int, rows: int) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(_cpu_seconds())
        self.tokens.append(int(tokens))
        self.rows.append(int(rows))
        if len(self.ends) == self.warmup:
            _release_free_memory()
            self.warm_rss = self.rss.mark()

    def summary(self, setup_rss: int) -> dict:
        w = self.warmup
        peaks = self.rss.peak()
        peak = peaks.get("vmhwm", peaks.get("sampled"))
        timed = self.ends[-1] - self.ends[w - 1]
        cpu = self.cpu[-1] - self.cpu[w - 1]
        tokens, rows = sum(self.tokens[w:]), sum(self.rows[w:])
        out = {
            "timed_steps": len(self.ends) - w, "timed_s": timed, "target_tokens": tokens, "rows": rows,
            "tokens_per_s": tokens / timed, "samples_per_s": rows / timed,
            "seconds_per_step": timed / (len(self.ends) - w), "cpu_s_per_step": cpu / (len(self.ends) - w),
            "step_s": [b - a for a, b in zip(self.ends[:-1], self.ends[1:])][w - 1:],
            "tokens_per_step": self.tokens[w:],
            "setup_rss_mib": setup_rss / MIB, "warm_rss_mib": self.warm_rss / MIB, "peak_rss_mib": peak / MIB,
            "peak_beyond_setup_mib": (peak - setup_rss) / MIB,
            # Beyond weights and optimizer states: the peak over the RSS that persists between steps.
            "peak_beyond_warm_mib": (peak - self.warm_rss) / MIB, "memory_method": self.rss.describe(),
        }
        if "sampled" in peaks:
            out["sampled_peak_beyond_setup_mib"] = (peaks["sampled"] - setup_rss) / MIB
        return {**out, **_device_figures()}


def _device_figures() -> dict:
    """Where the worker computed, and on a GPU its peak memory since the worker started (what
    tensors held, and what the caching allocator took from the driver)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {"device": "cpu"}
    return {"device": f"cuda: {torch.cuda.get_device_name()}",
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / MIB,
            "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved() / MIB}


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads. Less sensitive than wall time to other
    jobs on the machine (though not immune: shared caches, and spinning threads waiting for a peer)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _parallel_variant(name: str) -> tuple[str, int] | None:
    """("tp", N) for the tensor-parallel variant ``megakto-kto-tpN`` of megakto-kto, ("pp", N) for the
    pipeline variant ``megakto-kto-ppN``, else None."""
    for kind in ("tp", "pp"):
        suffix = name.removeprefix(f"megakto-kto-{kind}")
        if suffix != name and suffix.isdigit():
            return kind, int(suffix)
    return None


def _system(name: str) -> dict:
    """SYSTEMS[name], or a parallel variant (``megakto-kto-tpN``, ``megakto-kto-ppN``) of megakto-kto;
    ``ranks``: how many processes it runs on."""
    lora = name.removeprefix("megakto-kto-lora")
    if lora != name and lora.isdigit():
        return {**SYSTEMS["megakto-kto"], "lora": int(lora), "ranks": 1}
    variant = _parallel_variant(name)
    if variant is None:
        return {**SYSTEMS[name], "ranks": 1}
    kind, n = variant
    return {**SYSTEMS["megakto-kto"], kind: n, "ranks": n}


def run_megakto(name: str, spec: dict) -> dict:
    """megakto one ``trainer.next_step()`` at a time: in this process at world size 1 without the
    launcher, or as one rank of a tensor-parallel group that the launcher started."""
    system, work = _system(name), spec["workload"]
    tp, pp, ranks = system.get("tp", 1), system.get("pp", 1), system["ranks"]
    if ranks == 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch

    torch.set_num_threads(max(1, spec["threads"] // ranks))
    from megakto.config import load_config
    from megakto.trainer import KTOTrainer

    overrides = [
        f"model.path={work['model_dir']}", f"data.train_files={work['data_file']}", "data.max_length=512",
        f"train.global_batch_size={spec['batch']}", f"train.micro_batch_size={spec['micro_batch']}",
        f"train.max_steps={spec['warmup'] + spec['steps']}", f"optim.lr={spec['lr']}", "optim.warmup_steps=0",
        f"kto.loss_type={system['loss_type']}", f"ref.mode={system['ref']}", "ref.offload=none",
        f"output_dir={spec['out_dir']}", "seed=0", f"parallel.tp_size={tp}", f"parallel.pp_size={pp}",
        f"model.lora.r={system.get('lora', 0)}", "train.eval_samples=0", f"model.dtype={spec['dtype']}",
    ] + list(spec.get("megakto_overrides", []))
    cfg = load_config(None, overrides)
    rss = PeakRss(spec["sample_ms"] / 1000)
    start = time.perf_counter()
    trainer = KTOTrainer(cfg, spec["ds_config"])
    setup_s = time.perf_counter() - start
    setup_rss = rss.mark()
    targets = work["target_tokens"]
    _check_megakto_rows(trainer, targets)

    clock = _Clock(spec["warmup"], rss)
    own_tps = []
    for _ in range(cfg.train.max_steps):
        result = trainer.next_step()
        clock.step_done(sum(targets[i] for i in result.indices), len(result.indices))
        own_tps.append(result.metrics.get("tokens_per_s"))
    out = clock.summary(setup_rss)
    precompute = trainer.precompute_seconds if system["ref"] == "cache" else None
    if system["ref"] == "cache" and not precompute:
        out["warning"] = ("the trainer reports no precompute time (precompute_seconds is 0), so "
                          "nothing confirms a fresh reference pass; precompute is estimated from setup times")
        precompute = None
    out.update(setup_s=setup_s, precompute_s=precompute, trainer_tokens_per_s=own_tps[spec["warmup"]:],
               settings={"ds_config": spec["ds_config"], "zero_stage": trainer.ds_config.get("zero_optimization", {})
                         .get("stage"), "overrides": overrides, "packing": getattr(cfg.data, "packing", None),
                         "ranks": ranks})
    if pp > 1:
        m = trainer.dims.grad_accum
        out["pipeline"] = {"stages": pp, "micro_batches_per_step": m, "bubble": (pp - 1) / (m + pp - 1)}
    if ranks > 1:  # memory: the largest rank's
        from megakto.distributed import comm

        # The launcher started one tensor-parallel group or one pipeline (dp 1): gather its ranks' figures.
        group = trainer.dims.tp_group if tp > 1 else trainer.dims.pp_group
        per_rank = comm.all_gather_object({k: v for k, v in out.items() if k.startswith("peak")}, group=group)
        for key in per_rank[0]:
            values = [r[key] for r in per_rank if r[key] is not None]
            out[key] = max(values) if values else None
        out["peak_rss_mib_per_rank"] = [r.get("peak_rss_mib") for r in per_rank]
    return out


def _check_megakto_rows(trainer, targets: list[int]) -> None:
    """Dataset index i must be file row i with the expected completion length, or counts are wrong."""
    got = trainer.completion_lengths()
    if got != targets:
        raise RuntimeError(f"megakto tokenized {len(got)} rows whose completion lengths differ from the "
                           f"workload's ({len(targets)} rows); target token counts would be wrong")


def run_trl(name: str, spec: dict) -> dict:
    """TRL's KTOTrainer on the same folder and rows, timed by a callback at every step end."""
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    precompute = SYSTEMS[name]["precompute"]
    work = spec["workload"]
    tokenizer = AutoTokenizer.from_pretrained(work["model_dir"])
    train = datasets.load_dataset("json", data_files=work["data_file"], split="train")
    rss = PeakRss(spec["sample_ms"] / 1000)
    clock = _Clock(spec["warmup"], rss)
    pending = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(pending.pop("tokens"), pending.pop("rows"))

    timed_precompute = []
    original = KTOTrainer._precompute_ref_logps

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        result = original(self, *args, **kwargs)
        timed_precompute.append(time.perf_counter() - t)
        return result

    KTOTrainer._precompute_ref_logps = timed
    # bfloat16: the Trainer's mixed precision (float32 weights, bfloat16 autocast).
    bf16 = spec["dtype"] == "bfloat16" or (spec["dtype"] == "auto" and spec["device"] == "cuda")
    args = KTOConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["batch"] // spec["micro_batch"], max_length=512, bf16=bf16,
        fp16=False, gradient_checkpointing=False, use_cpu=spec["device"] == "cpu", report_to="none",
        save_strategy="no", logging_steps=1, beta=0.1, loss_type="kto", learning_rate=spec["lr"],
        max_steps=spec["warmup"] + spec["steps"], dataloader_num_workers=0, seed=0, disable_tqdm=True,
        precompute_ref_log_probs=precompute)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(work["model_dir"], dtype=torch.float32)
    ref = None if precompute else AutoModelForCausalLM.from_pretrained(work["model_dir"], dtype=torch.float32)
    trainer = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=train, processing_class=tokenizer,
                         callbacks=[Timer()])
    setup_s = time.perf_counter() - start
    setup_rss = rss.mark()

    # Count target tokens from the batches the loss actually sees (the collator's completion mask).
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *a, **kw):
        pending["tokens"] = pending.get("tokens", 0) + int(inputs["completion_mask"].sum())
        pending["rows"] = pending.get("rows", 0) + len(inputs["label"])
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = counting
    trainer.train()
    out = clock.summary(setup_rss)
    out.update(setup_s=setup_s, precompute_s=sum(timed_precompute) if precompute else None,
               settings={"ref_model": "none (precomputed)" if precompute else "separate copy",
                         "train_sampling_strategy": args.train_sampling_strategy, "bf16_autocast": bf16,
                         "gradient_accumulation_steps": args.gradient_accumulation_steps,
                         "max_grad_norm": args.max_grad_norm})
    return out


def worker(name: str, spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    run = run_megakto if _system(name)["kind"] == "megakto" else run_trl
    result = {"system": name, "ok": True, **run(name, spec)}
    if os.environ.get("RANK", "0") == "0":
        Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------
# Orchestration and report (the parent process)


def machine_info(threads: int, device: str = "cpu") -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "trl", "deepspeed", "datasets", "accelerate"):
        try:
            from importlib.metadata import version
            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads": threads, "device": device, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower one of the middle two), every run's figure
    attached; a failed run makes the system failed."""
    failed = [r for r in runs if not r.get("ok")]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    chosen["runs_peak_beyond_warm_mib"] = [r["peak_beyond_warm_mib"] for r in runs]
    return chosen


def add_derived(results: dict[str, dict], n_rows: int) -> None:
    """Fill megakto's precompute from setup times when the trainer does not expose it, and the
    throughput with the precompute amortised over one epoch of the benchmark's rows."""
    online, cached = results.get("megakto-kto", {}), results.get("megakto-kto-cached", {})
    if cached.get("ok") and cached.get("precompute_s") is None and online.get("ok"):
        cached["precompute_s"] = max(0.0, cached["setup_s"] - online["setup_s"])
        cached["precompute_note"] = "setup time minus megakto-kto's"
    for r in results.values():
        if not r.get("ok"):
            continue
        pre = r.get("precompute_s") or 0.0
        # The pass covers every row once; charge the timed steps their share of it.
        share = pre * r["rows"] / n_rows
        r["tokens_per_s_incl_precompute"] = r["target_tokens"] / (r["timed_s"] + share)
        r["tokens_per_cpu_s"] = r["target_tokens"] / (r["cpu_s_per_step"] * r["timed_steps"])


def ratios(results: dict[str, dict]) -> list[tuple[str, float | None]]:
    out = []
    for label, num, den, key in RATIOS:
        a, b = results.get(num, {}), results.get(den, {})
        ok = a.get("ok") and b.get("ok") and a.get(key) is not None and b.get(key)
        out.append((label, a[key] / b[key] if ok else None))
    return out


def markdown(results: dict[str, dict], ratio_rows: list[tuple[str, float | None]]) -> str:
    columns = COLUMNS + (GPU_COLUMNS if any("peak_gpu_mib" in r for r in results.values()) else [])
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for name, r in results.items():
        if not r.get("ok"):
            lines.append(f"| {name} | failed: {r.get('error', '?')} |" + " |" * (len(columns) - 2))
            continue
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    shown = [(label, v) for label, v in ratio_rows if v is not None]
    if shown:
        lines += ["", "| ratio | value |", "|---|---|"] + [f"| {label} | {v:.2f} |" for label, v in shown]
    return "\n".join(lines)


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
    ranks = _system(name)["ranks"]
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
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="also run megakto-kto with LoRA adapters of rank R (megakto-kto-loraR)")
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args(argv)
    if args.worker:  # a subprocess of this tool: it ends without the interpreter's teardown
        from megakto.distributed import comm

        comm.run_rank(lambda: worker(*args.worker))

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    for kind, n in (("tp", args.tp), ("pp", args.pp)):
        if n > 1:
            variant, label = f"megakto-kto-{kind}{n}", f"{kind.upper()}{n}"
            names.append(variant)
            RATIOS.extend([
                (f"megakto KTO {label} / megakto KTO, tokens/s", variant, "megakto-kto", "tokens_per_s"),
                (f"megakto KTO {label} / megakto KTO, peak beyond warm state (largest rank)", variant, "megakto-kto",
                 "peak_beyond_warm_mib"),
                (f"megakto KTO {label} / megakto KTO, peak RSS (largest rank)", variant, "megakto-kto",
                 "peak_rss_mib"),
            ])
    if args.lora:
        variant = f"megakto-kto-lora{args.lora}"
        names.append(variant)
        RATIOS.extend([
            (f"megakto KTO LoRA r={args.lora} / megakto KTO, tokens/s", variant, "megakto-kto", "tokens_per_s"),
            (f"megakto KTO LoRA r={args.lora} / megakto KTO, peak beyond warm state", variant, "megakto-kto",
             "peak_beyond_warm_mib"),
            (f"megakto KTO LoRA r={args.lora} / megakto KTO, peak RSS", variant, "megakto-kto", "peak_rss_mib"),
        ])
    unknown = [s for s in names if s not in SYSTEMS and not _parallel_variant(s)
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
    work = write_workload(workdir / "workload", vocab_size=args.vocab, n_rows=n_rows, seed=0, **model_shape(args))
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
    ratio_rows = ratios(results)
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
