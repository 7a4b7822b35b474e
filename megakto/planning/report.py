"""The plan as a table, as JSON, and the smallest changes that make a plan fit."""

from __future__ import annotations

import copy
from collections.abc import Callable

from megakto.errors import MegaktoError
from megakto.planning.accuracy import STATED_ACCURACY_PERCENT, accuracy_note
from megakto.planning.plan import GIB, GPU_HEADROOM, MemoryPlan

__all__ = ["format_plan", "plan_json", "Change", "candidate_changes", "fitting_changes"]


def _gib(n: float) -> str:
    return f"{n / GIB:9.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """Component x GiB per rank (device, host), the phases, the peak and the verdict."""
    p = plan.inputs
    dev = "GPU" if p.on_gpu else "CPU"
    sp = (f" x sp {p.sp}" if p.sp > 1 else "") + (f" (experts over ep {p.ep})" if p.ep > 1 else "")
    lines = [f"memory plan: world {p.world_size} = dp {p.dp} x tp {p.tp} x pp {p.pp}{sp}, ZeRO-{p.zero.get('stage', 0)}, "
             f"{'bf16' if p.weight_bytes == 2 else 'fp32'}, {dev}, reference {p.ref}"
             + (" (offloaded)" if p.ref == "online" and p.ref_offload else "")
             + f", gradient checkpointing {'on' if p.checkpointing else 'off'}",
             "parameters: " + ", ".join(f"{k} {v / 1e9:.3f}B" if v >= 1e8 else f"{k} {v:,}"
                                          for k, v in plan.params.items()),
             f"micro-batch: {p.train_tokens.tokens} tokens in {p.train_tokens.rows} rows of "
             f"{p.train_tokens.row_length}, {p.train_tokens.completion} scored"
             + (f"; {-(-p.train_tokens.tokens // p.sp)} tokens per rank of each sequence group of {p.sp}"
                if p.sp > 1 else ""),
             f"{'component':38s} {dev + ' GiB/rank':>12s} {'host GiB/rank':>14s}"]
    lines += [f"{name:38s} {_gib(d):>12s} {_gib(h):>14s}" for name, d, h in plan.rows]
    lines.append(f"{'= persistent':38s} {_gib(plan.persistent):>12s}")
    for name, v in plan.phases.items():
        lines.append(f"{'+ phase ' + name + (' (peak)' if name == plan.peak_phase else ''):38s} {_gib(v):>12s}")
        lines += [f"{'  incl. ' + term:38s} {_gib(b):>12s}" for term, b in plan.details.get(name, {}).items()]
    where = "GPU memory" if p.on_gpu else "process memory beyond start-up (device and host are one)"
    lines.append(f"peak per rank: {plan.peak_bytes_per_rank / GIB:.2f} GiB ({where}; {accuracy_note()}); host memory per node "
                 f"({min(p.world_size, p.gpus_per_node)} ranks): {plan.host_bytes_per_node / GIB:.1f} GiB")
    if plan.fits is not None:
        budget = plan.gpu_memory * (1 - GPU_HEADROOM)
        lines.append(f"fits: {'yes' if plan.fits else 'NO'} ({plan.peak_bytes_per_rank / GIB:.2f} GiB of "
                     f"{budget:.1f} usable = {plan.gpu_memory:g} GiB less {GPU_HEADROOM:.0%} for the CUDA context, "
                     "NCCL and fragmentation)")
    return "\n".join(lines)


def plan_json(plan: MemoryPlan) -> dict:
    return {"peak_bytes_per_rank": plan.peak_bytes_per_rank, "host_bytes_per_node": plan.host_bytes_per_node,
            "device_peak_bytes": plan.device_peak, "host_bytes_per_rank": plan.host_per_rank,
            "persistent_bytes": plan.persistent, "peak_phase": plan.peak_phase, "phases": plan.phases,
            "components": {name: {"device": d, "host": h} for name, d, h in plan.rows},
            "params": plan.params, "fits": plan.fits, "gpu_memory_gib": plan.gpu_memory,
            "world_size": plan.inputs.world_size, "dp": plan.inputs.dp, "tp": plan.inputs.tp, "pp": plan.inputs.pp,
            "sp": plan.inputs.sp, "ep": plan.inputs.ep, "phase_terms": plan.details,
            "stated_accuracy_percent": STATED_ACCURACY_PERCENT}


# A change: (what to tell the user, extra config overrides, DeepSpeed JSON edit, world-size factor).
Change = tuple[str, list[str], Callable[[dict], dict] | None, int]


def _offload(ds: dict) -> dict:
    ds = copy.deepcopy(ds)
    ds.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return ds


def _stage3(ds: dict) -> dict:
    ds = copy.deepcopy(ds)
    ds.setdefault("zero_optimization", {})["stage"] = 3
    return ds


def candidate_changes(plan: MemoryPlan, micro_batch_size: int) -> list[Change]:
    """The knobs, cheapest first, that apply to this plan."""
    p, out = plan.inputs, []
    stage = int(p.zero.get("stage", 0))
    if p.ref == "online":
        out.append(("ref.mode=cache", ["ref.mode=cache"], None, 1))
        if not p.ref_offload and p.pp == 1:
            out.append(("ref.offload=cpu", ["ref.offload=cpu"], None, 1))
    if not p.checkpointing:
        out.append(("model.gradient_checkpointing=true", ["model.gradient_checkpointing=true"], None, 1))
    if micro_batch_size > 1:
        out.append((f"train.micro_batch_size={micro_batch_size // 2}",
                    [f"train.micro_batch_size={micro_batch_size // 2}"], None, 1))
    if stage < 3 and p.pp == 1:
        out.append(("zero_optimization.stage=3 in the DeepSpeed JSON", [], _stage3, 1))
    if stage >= 1 and (p.zero.get("offload_optimizer") or {}).get("device") != "cpu":
        out.append(("zero_optimization.offload_optimizer={device: cpu} in the DeepSpeed JSON", [], _offload, 1))
    if p.pp == 1 and not p.lora_trainable:
        out.append((f"parallel.tp_size={p.tp * 2}", [f"parallel.tp_size={p.tp * 2}"], None, 1))
        # Sequence ranks split a row's activations (and need ZeRO-3; refused otherwise, so skipped).
        out.append((f"parallel.sp_size={p.sp * 2}", [f"parallel.sp_size={p.sp * 2}"], None, 1))
    out.append((f"--world-size {p.world_size * 2}", [], None, 2))
    return out


def fitting_changes(plan: MemoryPlan, replan: Callable[[list[str], dict | None, int], MemoryPlan],
                    micro_batch_size: int, ds: dict, max_steps: int = 3) -> list[tuple[str, MemoryPlan]]:
    """Single changes that make ``plan`` fit, each with its plan; when none does, the combination
    found by taking, up to ``max_steps`` times, the change that lowers the peak most."""
    def attempt(changes: list[Change]):
        overrides, edited, factor = [], ds, 1
        for _, o, edit, f in changes:
            overrides += o
            edited = edit(edited) if edit else edited
            factor *= f
        try:
            return replan(overrides, edited, factor)
        except MegaktoError:  # e.g. a tp_size the model or the world does not divide
            return None

    singles = [(c, attempt([c])) for c in candidate_changes(plan, micro_batch_size)]
    singles = [(c, q) for c, q in singles if q is not None]
    fits = [(c[0], q) for c, q in singles if q.fits]
    if fits:
        return fits
    chosen: list[Change] = []
    current = plan
    for _ in range(max_steps):
        options = [(c, attempt(chosen + [c])) for c in candidate_changes(current, micro_batch_size)
                   if c[0] not in [x[0] for x in chosen]]
        options = [(c, q) for c, q in options if q is not None and q.peak_bytes_per_rank < current.peak_bytes_per_rank]
        if not options:
            break
        best, current = min(options, key=lambda cq: cq[1].peak_bytes_per_rank)
        chosen.append(best)
        if current.fits:
            return [(" + ".join(c[0] for c in chosen), current)]
    return []
