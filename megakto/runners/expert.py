"""The expert-parallel mode (``parallel.ep_size`` > 1): DeepSpeed's AutoEP, for mixture-of-experts
models whose experts are too many to gather whole on every rank for every forward.

Every rank is a data-parallel rank: rows are split over all of them, and the dense weights (attention,
norms, embeddings, routers) are trained under the JSON's ZeRO stage (0-3) as in the ZeRO mode. In
``deepspeed.initialize`` AutoEP replaces each MoE block with a layer holding the router and this
rank's 1/ep of the experts; each forward sends every token to the ranks holding its top-k experts
and back (two all-to-alls per MoE layer, over the ``ep`` consecutive ranks of its expert group).
Expert gradients are averaged over the ranks holding the same experts (the expert-data-parallel
group, world / ep ranks), the dense ones over the world, so the update equals one process's on the
same global batch.

**Lockstep.** An all-to-all needs every rank of the expert group in every forward, in the same
order. The step already runs alike everywhere: each rank scores its ``grad_accum`` micro-batches
(reference on target and KL rows, policy on KL rows), then trains them, and a skipped step is
decided on all-reduced values; evaluation and the reference cache's precompute go through
:func:`~megakto.distributed.sharded.score_sharded`, where a rank whose share ran out scores a filler
row; the start-up packing check scores the same rows on every rank. Generated eval samples are off
(generation runs a rank-dependent number of forwards).

**Reference.** Online: the reference weights in a frozen ZeRO-3 inference engine under AutoEP as
well (a ZeRO-1/2 engine cannot be built without an optimizer); or the cache. LoRA is refused (AutoEP
replaces the blocks peft would wrap).

**Checkpoints** record ``ep_size``; one resumes as it is with the same ep_size and world, and through
its universal form at another (:mod:`megakto.checkpoint.universal`; under Hugging Face names for
``ep_size`` 1). The export reads that form too, the experts gathered and renamed back
(:func:`megakto.checkpoint.weights.expert_weights`).
"""

from __future__ import annotations

from typing import Callable

from megakto.distributed import comm, engine as ds_engine
from megakto.distributed.parallel import ParallelDims
from megakto.errors import ConfigError, MegaktoError
from megakto.model.families import EXPERT_COUNT_KEYS, num_experts
from megakto.runners.base import ModeSetup
from megakto.runners.zero import ZeroMode, ZeroRunner

__all__ = ["ExpertMode", "SAMPLES_OFF_EP", "check_model"]

SAMPLES_OFF_EP = ("eval samples: off under expert parallelism (generation runs a different number of forwards on "
                  "each rank, and every forward's all-to-all needs all of them); set train.eval_samples=0 to silence "
                  "this")

def check_model(config, dims: ParallelDims, *, key: str, path: str) -> str:
    """The model against ``parallel.ep_size``, before any weight loads: a family DeepSpeed has an
    AutoEP preset for, an expert count that ``ep`` divides. Returns the preset's name."""
    ep = dims.ep
    types = [config.model_type, config.get_text_config().model_type]
    preset = next((ds_engine.autoep_preset(t) for t in types if ds_engine.autoep_preset(t)), None)
    if preset is None:
        raise ConfigError(f"parallel.ep_size={ep}: {key}={path} is a {config.model_type} model, for which DeepSpeed "
                          f"has no AutoEP preset (it has: {', '.join(ds_engine.AUTOEP_PRESETS)}); set "
                          "parallel.ep_size=1")
    experts = num_experts(config)
    if experts is None or experts % ep:
        raise ConfigError(f"parallel.ep_size={ep} does not divide the {experts} experts per layer of {key}={path} "
                          f"(config.json {'/'.join(EXPERT_COUNT_KEYS)}); use a divisor of {experts}")
    return preset


def grouped_mm_aligned(config, itemsize: int) -> bool:
    """Whether torch's grouped GEMM takes this model's expert matrices: on CPU it needs the rows of
    both (hidden and expert-intermediate sizes × bytes per element) 16-byte aligned."""
    text = config.get_text_config()
    inner = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", 0)
    return all(d * itemsize % 16 == 0 for d in (text.hidden_size, inner))


class ExpertMode(ZeroMode):
    """ZeRO 0-3 over all ranks, each MoE layer's experts split over ``dims.ep`` of them by AutoEP
    (:class:`~megakto.runners.base.ParallelMode`)."""

    def __init__(self, setup: ModeSetup):
        super().__init__(setup)
        self.ep_group = None  # this rank's expert-parallel group, set by attach_groups

    def switch_features(self) -> None:
        from transformers import AutoConfig

        section = self.ds_config["expert_parallel"]
        config = AutoConfig.from_pretrained(self.cfg.model.path, trust_remote_code=self.cfg.model.trust_remote_code)
        itemsize = self.dtype.itemsize
        if "use_grouped_mm" not in section:
            section["use_grouped_mm"] = ds_engine.on_gpu() or grouped_mm_aligned(config, itemsize)
            if not section["use_grouped_mm"]:
                self.log(f"expert parallelism: grouped GEMM off (expert_parallel.use_grouped_mm=false): the expert "
                         f"matrices' rows are not 16-byte aligned in {self.dtype} on CPU; one matmul per expert")
        self.log(f"expert parallelism: AutoEP preset {section['preset_model']}, {num_experts(config)} experts per "
                 f"layer over {self.dims.ep} ranks ({num_experts(config) // self.dims.ep} each), "
                 f"each expert held by {self.dims.world_size // self.dims.ep} of the {self.dims.world_size} ranks")

    def attach_groups(self, policy) -> ParallelDims:
        """The ZeRO mode's groups (every rank data-parallel), and the engine's expert group checked to
        be the ``ep`` consecutive ranks the mode's arithmetic names."""
        dims = super().attach_groups(policy)
        self.ep_group, _ = ds_engine.expert_groups(dims.ep)
        first = dims.rank // dims.ep * dims.ep
        with comm.fail_together(group=comm.world_group()):
            got, want = comm.group_ranks(group=self.ep_group), list(range(first, first + dims.ep))
            if got != want:
                raise MegaktoError(f"rank {dims.rank}: DeepSpeed's expert-parallel group is {got}, the mesh "
                                   f"arithmetic says {want} ({dims.describe()})")
        return dims

    def online_reference(self, runner: ZeroRunner, *, batcher, logps_fn: Callable):
        self.log(f"reference: a frozen ZeRO-3 inference engine under AutoEP, experts over {self.dims.ep} ranks")
        return super().online_reference(runner, batcher=batcher, logps_fn=logps_fn)

    def samples_off(self) -> str | None:
        return SAMPLES_OFF_EP
