"""The systems tools/bench.py compares, each run inside its own worker process: megakto (KTO with an
online or cached reference, SFT, and its tensor-parallel, pipeline, sequence-parallel,
expert-parallel, data-parallel and LoRA variants) and TRL's KTOTrainer (online, or with its
reference log-probs precomputed)."""

from __future__ import annotations

import os
import time

from _bench_measure import PeakRss, StepClock
from _launch import free_port

__all__ = ["SYSTEMS", "measure", "parallel_variant", "system_spec"]

# name -> how it runs. "ref" is megakto's ref.mode; TRL's precompute drops the reference model
# (ref_model=None), which is what TRL's precompute_ref_log_probs is for.
SYSTEMS = {
    "megakto-kto": {"kind": "megakto", "loss_type": "kto", "ref": "online"},
    "megakto-kto-cached": {"kind": "megakto", "loss_type": "kto", "ref": "cache"},
    "megakto-sft": {"kind": "megakto", "loss_type": "sft", "ref": "online"},
    "trl-kto": {"kind": "trl", "precompute": False},
    "trl-kto-precomputed": {"kind": "trl", "precompute": True},
}


# parallel variants of megakto-kto: megakto-kto-<kind>N on N ranks ("dp": plain ZeRO-3 data parallel,
# the expert-parallel variant's baseline at the same ranks)
PARALLEL_KINDS = ("tp", "pp", "sp", "ep", "dp")


def parallel_variant(name: str) -> tuple[str, int] | None:
    """("tp", N) for the tensor-parallel variant ``megakto-kto-tpN`` of megakto-kto, ("pp", N) for the
    pipeline variant ``megakto-kto-ppN``, ("sp", N) for the sequence-parallel ``megakto-kto-spN``,
    ("ep", N) for the expert-parallel ``megakto-kto-epN``, ("dp", N) for plain data parallel
    ``megakto-kto-dpN``, else None."""
    for kind in PARALLEL_KINDS:
        suffix = name.removeprefix(f"megakto-kto-{kind}")
        if suffix != name and suffix.isdigit():
            return kind, int(suffix)
    return None


def system_spec(name: str) -> dict:
    """SYSTEMS[name], or a parallel variant (``megakto-kto-tpN``, ``-ppN``, ``-spN``, ``-epN``, ``-dpN``) of
    megakto-kto;
    ``ranks``: how many processes it runs on."""
    lora = name.removeprefix("megakto-kto-lora")
    if lora != name and lora.isdigit():
        return {**SYSTEMS["megakto-kto"], "lora": int(lora), "ranks": 1}
    variant = parallel_variant(name)
    if variant is None:
        return {**SYSTEMS[name], "ranks": 1}
    kind, n = variant
    return {**SYSTEMS["megakto-kto"], kind: n, "ranks": n}


def run_megakto(name: str, spec: dict) -> dict:
    """megakto one ``trainer.next_step()`` at a time: in this process at world size 1 without the
    launcher, or as one rank of a tensor-parallel group that the launcher started."""
    system, work = system_spec(name), spec["workload"]
    tp, pp, sp, ep, ranks = (system.get(k, 1) for k in ("tp", "pp", "sp", "ep", "ranks"))
    if ranks == 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch

    torch.set_num_threads(max(1, spec["threads"] // ranks))
    from megakto.config import load_config
    from megakto.trainer import KTOTrainer

    overrides = [
        f"model.path={work['model_dir']}", f"data.train_files={work['data_file']}",
        f"data.max_length={max_length(work)}",
        f"train.global_batch_size={spec['batch']}", f"train.micro_batch_size={spec['micro_batch']}",
        f"train.max_steps={spec['warmup'] + spec['steps']}", f"optim.lr={spec['lr']}", "optim.warmup_steps=0",
        f"kto.loss_type={system['loss_type']}", f"ref.mode={system['ref']}", "ref.offload=none",
        f"output_dir={spec['out_dir']}", "seed=0", f"parallel.tp_size={tp}", f"parallel.pp_size={pp}",
        f"parallel.sp_size={sp}", f"parallel.ep_size={ep}",
        f"model.lora.r={system.get('lora', 0)}", "train.eval_samples=0", f"model.dtype={spec['dtype']}",
    ] + list(spec.get("megakto_overrides", []))
    cfg = load_config(None, overrides)
    rss = PeakRss(spec["sample_ms"] / 1000)
    start = time.perf_counter()
    trainer = KTOTrainer(cfg, spec["ds_config"])
    setup_s = time.perf_counter() - start
    setup_rss = rss.mark()
    targets = work["target_tokens"]
    check_megakto_rows(trainer, targets)

    clock = StepClock(spec["warmup"], rss)
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
    if ep > 1 or system.get("dp"):
        out["planned_peak_mib"] = planned_peak_mib(spec, overrides, ranks)
    if pp > 1:
        m = trainer.dims.grad_accum
        out["pipeline"] = {"stages": pp, "micro_batches_per_step": m, "bubble": (pp - 1) / (m + pp - 1)}
    if ranks > 1:  # memory: the largest rank's
        from megakto.distributed import comm

        # The launcher started one tensor-parallel group, one sequence-parallel group, one pipeline
        # (dp 1) or, for ep/dp, data-parallel ranks over the world: gather its ranks' figures.
        group = (trainer.dims.tp_group if tp > 1 else trainer.dims.sp_group if sp > 1 else trainer.dims.pp_group
                 if pp > 1 else comm.world_group())
        per_rank = comm.all_gather_object({k: v for k, v in out.items() if k.startswith("peak")}, group=group)
        for key in per_rank[0]:
            values = [r[key] for r in per_rank if r[key] is not None]
            out[key] = max(values) if values else None
        out["peak_rss_mib_per_rank"] = [r.get("peak_rss_mib") for r in per_rank]
    return out


def planned_peak_mib(spec: dict, overrides: list[str], ranks: int) -> float:
    """megakto's memory planner (megakto/planning) for the same config and ranks: peak MiB per rank."""
    from megakto.planning.run_plan import PlanRequest, make_plan

    _, plan = make_plan(PlanRequest(None, spec["ds_config"], tuple(overrides), ranks, on_gpu=spec["device"] == "cuda"))
    return plan.peak_bytes_per_rank / 2**20


def max_length(work: dict) -> int:
    """megakto's data.max_length for the workload: its longest row (BOS, prompt, completion, EOS)
    rounded up to a multiple of 64, at least 512 (the default workload's)."""
    longest = 1 + work["prompt_words"][1] + work["completion_words"][1] + 1
    return max(512, -(-longest // 64) * 64)


def check_megakto_rows(trainer, targets: list[int]) -> None:
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
    clock = StepClock(spec["warmup"], rss)
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
        gradient_accumulation_steps=spec["batch"] // spec["micro_batch"], max_length=max_length(work), bf16=bf16,
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


def measure(name: str, spec: dict) -> dict:
    """Run system ``name`` on the workload of ``spec`` in this process and return its figures."""
    run = run_megakto if system_spec(name)["kind"] == "megakto" else run_trl
    return run(name, spec)
