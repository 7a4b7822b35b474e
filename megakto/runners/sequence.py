"""The sequence-parallel mode (``parallel.sp_size`` > 1): DeepSpeed's Ulysses under ZeRO-3, for
completions too long for one rank's activations.

Ranks come in sequence groups of ``sp`` consecutive ranks (megakto.distributed.parallel). The ranks
of a group hold the same rows: the trainer plans micro-batches by data-parallel rank, which they
share, and each rank runs the model on its contiguous shard of every micro-batch's tokens
(megakto.data.sp_shards). Activations per rank are 1/sp of the sequence's; each attention layer
swaps the sequence shard for a head shard (an all-to-all) and attends over the whole sequence
with the core attention the run resolved: flash-attention varlen on GPU, or ``packed_sdpa``
(megakto.model.sp_attention), both keeping packed sequences apart by their ``position_ids``.

Per micro-batch every rank scores its shard's completion tokens, and the partial sums are added
over the group with a differentiable all-reduce whose gradient is scaled for ZeRO-3's averaging
(megakto.distributed.sequence), so the loss is computed alike on every rank of the group and the
update equals one process's on the same global batch. Everything else is the ZeRO mode: one
forward, backward and step per micro-batch, the reference a frozen ZeRO-3 engine (in eval mode,
its attention still sequence-sharded), the cache's precompute through the same log-prob function.
The KL estimate, metrics, evaluation and the cache's precompute split and reduce over the
data-parallel group: the ranks holding different rows (the same place in their sequence groups).
"""

from __future__ import annotations

from typing import Callable

from megakto.data.batcher import Batcher
from megakto.distributed import comm, engine as ds_engine
from megakto.distributed.parallel import ParallelDims
from megakto.distributed.sequence import grad_scale, sequence_sum
from megakto.model.packing_check import startup_packing_check
from megakto.model.sp_forward import sp_logps_function
from megakto.runners.base import ModeSetup
from megakto.runners.zero import ZeroMode, ZeroRunner, check_groups, optim_settings

__all__ = ["SequenceMode", "SAMPLES_OFF_SP"]

SAMPLES_OFF_SP = ("eval samples: off under sequence parallelism (generation would run every rank's copy of a prompt "
                  "through the sequence-sharded attention); set train.eval_samples=0 to silence this")


class SequenceMode(ZeroMode):
    """ZeRO-3 over sequence × data-parallel ranks, Ulysses attention over ``dims.sp`` ranks
    (:class:`~megakto.runners.base.ParallelMode`). The trainer's log-prob function is replaced by
    the sequence-parallel one (:func:`~megakto.model.sp_forward.sp_logps_function`) everywhere this
    mode runs a model: policy passes, the reference, the start-up packing check."""

    def __init__(self, setup: ModeSetup):
        super().__init__(setup)
        self.mpu = None  # DeepSpeed's sequence-parallel state, from the Ulysses registration
        self.logps: Callable | None = None  # (model, PackedBatch) -> (logps, n_tokens), set by attach_groups

    def _engine(self, model, ds_config: dict):
        """Ulysses swapped in for the attention ``model`` loaded with, then the ZeRO-3 engine over
        DeepSpeed's sequence groups (the swap is process-wide: the reference shares it)."""
        self.mpu = ds_engine.register_ulysses(model, self.dims.sp, self.cfg.model.attn_implementation)
        return ds_engine.build_policy_engine(model, ds_config, mpu=self.mpu, **optim_settings(self.cfg))

    def attach_groups(self, policy) -> ParallelDims:
        """DeepSpeed's sequence groups and the data-parallel groups beside them, checked against the
        mesh arithmetic (megakto splits rows by ``dims.dp_rank``; the sequence ranks must be the
        consecutive ranks the shards are cut for)."""
        dp_group, sp_group = ds_engine.sequence_groups(self.mpu, self.dims.sp)
        dims = self.dims.with_groups(dp=dp_group, tp=None, pp=None, sp=sp_group)
        with comm.fail_together(group=comm.world_group()):
            check_groups(dims, "sp", dims.sp_group, dims.sp_group_ranks())
        combine = sequence_sum(group=sp_group, scale=grad_scale(self.ds_config, dims.sp))
        self.logps = sp_logps_function(sp_size=dims.sp, sp_rank=dims.sp_rank, combine=combine,
                                       chunk_tokens=self.cfg.model.logps_chunk_tokens)
        self.dims = dims
        return dims

    def runner(self, policy, dims: ParallelDims, *, batcher: Batcher, logps_fn: Callable) -> ZeroRunner:
        return ZeroRunner(policy, batcher=batcher, logps_fn=self.logps, dp_group=dims.dp_group)

    def check_packing(self, policy, logps_fn: Callable, tokenizer, *, device) -> None:
        startup_packing_check(policy, self.logps, self.cfg, 1, tokenizer, dtype=self.dtype, device=device,
                              log=self.log)

    def online_reference(self, runner: ZeroRunner, *, batcher: Batcher, logps_fn: Callable):
        return super().online_reference(runner, batcher=batcher, logps_fn=self.logps)

    def samples_off(self) -> str | None:
        return SAMPLES_OFF_SP
