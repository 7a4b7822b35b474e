"""The memory plan of a command line (``--config``, ``--deepspeed``, overrides, world size): what
tools/plan_memory.py and ``launch/train_kto.py --dry-run`` print."""

from __future__ import annotations

from dataclasses import dataclass

from megakto.config import Config, load_config
from megakto.distributed.ds_config import load_ds_json
from megakto.planning.activations import Tokens
from megakto.planning.inputs import plan_inputs
from megakto.planning.plan import MemoryPlan, plan_memory
from megakto.planning.report import fitting_changes, format_plan
from megakto.model.shape import ModelShape

__all__ = ["PlanRequest", "make_plan", "plan_report"]


@dataclass(frozen=True)
class PlanRequest:
    config: str | None
    deepspeed: str
    overrides: tuple[str, ...]
    world_size: int
    on_gpu: bool = True
    gpu_memory: float | None = None
    gpus_per_node: int = 8
    tokens: Tokens | None = None  # the largest micro-batch of the dry run's data plan; None = worst case


def make_plan(req: PlanRequest, shape: ModelShape | None = None, *, extra: list[str] = (), ds: dict | None = None,
              world_factor: int = 1) -> tuple[Config, MemoryPlan]:
    """Load and check the config and JSON as a run does, then plan; ``extra``/``ds``/``world_factor``
    apply a suggested change."""
    cfg = load_config(req.config, list(req.overrides) + list(extra))
    if shape is None:
        from megakto.model.meta import model_shape

        shape = model_shape(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    ds = load_ds_json(req.deepspeed) if ds is None else ds
    world = req.world_size * world_factor
    inputs = plan_inputs(cfg, ds, shape, world_size=world, on_gpu=req.on_gpu, gpus_per_node=req.gpus_per_node,
                         source=req.deepspeed, tokens=req.tokens if not extra else None)
    return cfg, plan_memory(inputs, req.gpu_memory)


def plan_report(req: PlanRequest, shape: ModelShape | None = None) -> tuple[MemoryPlan, str, list]:
    """(plan, its table with the verdict and, when it does not fit, the smallest changes that make
    it fit, those changes)."""
    cfg, plan = make_plan(req, shape)
    shape = plan.inputs.shape
    text = format_plan(plan)
    changes = []
    if plan.fits is False:
        def replan(extra, ds, factor):
            return make_plan(req, shape, extra=extra, ds=ds, world_factor=factor)[1]

        changes = fitting_changes(plan, replan, cfg.train.micro_batch_size, load_ds_json(req.deepspeed))
        if changes:
            text += "\nchanges that make it fit (each alone unless joined by +):\n" + "\n".join(
                f"  {name}: peak {q.peak_bytes_per_rank / 2**30:.2f} GiB per rank, host "
                f"{q.host_bytes_per_node / 2**30:.1f} GiB per node" for name, q in changes)
        else:
            text += "\nno single knob or combination of up to three makes it fit: add ranks"
    return plan, text, changes
