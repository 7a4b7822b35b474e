"""Parallel degrees and the batch arithmetic, validated once.

``world = dp × tp × pp × sp``. Ranks in one tensor/pipeline/sequence group see the same rows, so
only ``dp`` splits the data: each optimizer step consumes ``global_batch_size = micro_batch_size ×
grad_accum × dp`` rows, split into ``dp × grad_accum`` micro-batches (the trainer's
``megakto.data.packing.plan_micro_batches``); data-parallel rank ``r`` owns micro-batches
``r*grad_accum .. r*grad_accum + grad_accum - 1``.

The mesh is (dp, tp) with tensor parallelism innermost, as DeepSpeed's AutoTP builds it: global
rank ``r`` has ``tp_rank = r % tp`` and ``dp_rank = r // tp``; with 4 ranks and tp 2 the TP groups
are {0,1}, {2,3} and the DP groups {0,2}, {1,3}. Pipelines (tp 1) are pipe-major, as
``deepspeed.pipe``'s topology lays them out: ``pp_rank = r // dp`` (the stage), ``dp_rank = r % dp``;
with 4 ranks and pp 2 stage 0 is on {0,1}, stage 1 on {2,3}, the pipelines {0,2}, {1,3}.
Sequence parallelism (tp = pp = 1) is laid out like tensor parallelism, as DeepSpeed's Ulysses
groups are: ``sp_rank = r % sp``, ``dp_rank = r // sp``; with 4 ranks and sp 2 the sequence groups
are {0,1}, {2,3} and the data-parallel groups (the ranks holding different rows) {0,2}, {1,3}.

Pure arithmetic: no torch.distributed here, so every check runs before any process group exists.
The process groups themselves are attached with :meth:`ParallelDims.with_groups` once the engine
has built them (:func:`megakto.distributed.engine.parallel_groups`); the parallel mode checks there
that their members are the ranks this arithmetic names. Reading a group before that is an error,
never a silent fallback to the world.
"""

from dataclasses import dataclass, field, replace
from typing import Any

from megakto.errors import ConfigError

__all__ = ["MeshGroups", "ParallelDims", "mesh_text"]


@dataclass(frozen=True)
class MeshGroups:
    """One rank's process groups. ``dp``: its data-parallel group, always named (the world's,
    ``comm.world_group()``, when the data-parallel ranks are all the ranks); ``tp``, ``pp``: its
    tensor-parallel, pipeline and sequence-parallel groups, None where that degree is 1 (no such group: nothing is
    reduced over it)."""

    dp: Any
    tp: Any
    pp: Any
    sp: Any = None


def mesh_text(dp: int | None, *, tp: int = 1, pp: int = 1, sp: int = 1, ep: int = 1) -> str:
    """``dp 2 × tp 1 × pp 1`` (``× sp N`` appended under sequence parallelism, ``(experts over ep N)``
    under expert parallelism, whose ranks are data-parallel ranks; ``dp`` None: left out)."""
    return (("" if dp is None else f"dp {dp} × ") + f"tp {tp} × pp {pp}" + (f" × sp {sp}" if sp > 1 else "")
            + (f" (experts over ep {ep})" if ep > 1 else ""))


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    global_batch_size: int
    micro_batch_size: int
    tp: int = 1
    pp: int = 1
    rank: int = 0  # this process's global rank
    sp: int = 1  # sequence-parallel (Ulysses) degree: each row's tokens split over sp ranks
    ep: int = 1  # expert-parallel (AutoEP) degree: each MoE layer's experts split over ep data-parallel ranks
    # The process groups, set by with_groups() once the engine has built them; None until then.
    groups: MeshGroups | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("world_size", "global_batch_size", "micro_batch_size", "tp", "pp", "sp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ParallelDims.{name} must be a positive int, got {value!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"ParallelDims.rank must be in [0, {self.world_size}), got {self.rank!r}")
        if self.sp > 1 and (self.tp > 1 or self.pp > 1):
            raise ConfigError(f"parallel.sp_size={self.sp} with parallel.tp_size={self.tp}, parallel.pp_size={self.pp}: "
                              "DeepSpeed has no mesh of sequence with tensor or pipeline parallelism; use one of them")
        if self.ep > 1 and (self.tp > 1 or self.pp > 1 or self.sp > 1):
            raise ConfigError(f"parallel.ep_size={self.ep} with parallel.tp_size={self.tp}, parallel.pp_size={self.pp}, "
                              f"parallel.sp_size={self.sp}: expert parallelism runs over data-parallel ranks only; "
                              "set the other degrees to 1")
        if self.world_size % self.ep:
            raise ConfigError(f"world size {self.world_size} is not divisible by parallel.ep_size={self.ep}; launch a "
                              f"multiple of {self.ep} processes")
        model_parallel = self.tp * self.pp * self.sp
        if self.world_size % model_parallel:
            degrees = (f"tp × pp = {self.tp} × {self.pp}" if self.sp == 1 else
                       f"tp × pp × sp = {self.tp} × {self.pp} × {self.sp}")
            raise ConfigError(
                f"world size {self.world_size} is not divisible by {degrees} "
                f"= {model_parallel}; launch a multiple of {model_parallel} processes"
            )
        rows_per_micro_step = self.micro_batch_size * self.dp
        if self.global_batch_size % rows_per_micro_step:
            lower = self.global_batch_size // rows_per_micro_step * rows_per_micro_step
            upper = lower + rows_per_micro_step
            hint = f"{lower} or {upper}" if lower else f"{upper}"
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size × data-parallel size = {self.micro_batch_size} × {self.dp} "
                f"= {rows_per_micro_step} (world {self.world_size} = {self._mesh()}); use a multiple of "
                f"{rows_per_micro_step} such as {hint}"
            )

    def _mesh(self) -> str:
        return mesh_text(self.dp, tp=self.tp, pp=self.pp, sp=self.sp, ep=self.ep)

    def describe(self) -> str:
        return (f"world {self.world_size} = {self._mesh()}; global batch "
                f"{self.global_batch_size} = micro {self.micro_batch_size} × grad-accum {self.grad_accum} × dp {self.dp}")

    @classmethod
    def from_config(cls, cfg, world_size: int, *, rank: int = 0, tp: int | None = None,
                    pp: int | None = None, sp: int | None = None, ep: int | None = None) -> "ParallelDims":
        """Degrees for ``cfg.train``'s batch sizes and ``cfg.parallel`` on ``world_size`` processes
        (``tp``/``pp``/``sp``/``ep`` override ``cfg.parallel``)."""
        return cls(
            world_size=world_size,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            tp=cfg.parallel.tp_size if tp is None else tp,
            pp=cfg.parallel.pp_size if pp is None else pp,
            rank=rank,
            sp=cfg.parallel.sp_size if sp is None else sp,
            ep=cfg.parallel.ep_size if ep is None else ep,
        )

    def with_groups(self, *, dp, tp, pp, sp=None) -> "ParallelDims":
        """The same degrees with the engine's data-parallel (``dp``), tensor-parallel (``tp``) and
        pipeline (``pp``) and sequence-parallel (``sp``) groups attached: each named, the world's
        included; ``tp``/``pp``/``sp`` None exactly where that degree is 1 (:class:`MeshGroups`)."""
        for kind, degree, group in (("tp", self.tp, tp), ("pp", self.pp, pp), ("sp", self.sp, sp)):
            if (group is None) != (degree == 1):
                raise ValueError(f"ParallelDims.with_groups: {kind}={group!r} at {kind} degree {degree}; a group "
                                 "is attached exactly where the degree is above 1")
        return replace(self, groups=MeshGroups(dp, tp, pp, sp))

    def _attached(self) -> MeshGroups:
        if self.groups is None:
            raise RuntimeError("ParallelDims: process groups read before they were attached (with_groups, once "
                               "the policy engine has built them)")
        return self.groups

    @property
    def dp_group(self):
        """This rank's data-parallel group: the ranks whose rows differ (tensor-parallel peers and
        pipeline stages hold the same ones)."""
        return self._attached().dp

    @property
    def tp_group(self):
        """This rank's tensor-parallel group; None at tp 1."""
        return self._attached().tp

    @property
    def pp_group(self):
        """This rank's pipeline group; None at pp 1."""
        return self._attached().pp

    @property
    def sp_group(self):
        """This rank's sequence-parallel (Ulysses) group; None at sp 1."""
        return self._attached().sp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        """The pipeline stage of this rank (0 without pipelines)."""
        return self.rank // self.dp if self.pp > 1 else 0

    @property
    def sp_rank(self) -> int:
        """This rank's place in its sequence-parallel group: which shard of each row it holds."""
        return self.rank % self.sp

    @property
    def first_of_replica(self) -> bool:
        """Whether this rank is the first of the ranks that hold the same rows (its tensor-parallel,
        pipeline and sequence-parallel peers): the one that writes what they share."""
        return self.tp_rank == 0 and self.pp_rank == 0 and self.sp_rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp if self.pp > 1 else self.rank // (self.tp * self.sp)

    def dp_group_ranks(self) -> list[int]:
        """Global ranks of this rank's data-parallel group (same tp or sp coordinate, or stage), in dp order."""
        if self.pp > 1:
            return [self.pp_rank * self.dp + d for d in range(self.dp)]
        inner = self.tp * self.sp  # one of them is 1
        return [d * inner + self.rank % inner for d in range(self.dp)]

    def sp_group_ranks(self) -> list[int]:
        """Global ranks of this rank's sequence-parallel group (same dp coordinate), shard 0 first."""
        return [self.dp_rank * self.sp + s for s in range(self.sp)]

    def tp_group_ranks(self) -> list[int]:
        """Global ranks of this rank's tensor-parallel group (same dp coordinate), in tp order."""
        return [self.dp_rank * self.tp + t for t in range(self.tp)]

    def pp_group_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline (same dp coordinate), stage 0 first."""
        return [s * self.dp + self.dp_rank for s in range(self.pp)]

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.sp)

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches in one global batch, over all data-parallel ranks."""
        return self.dp * self.grad_accum
