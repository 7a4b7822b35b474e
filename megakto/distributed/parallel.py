"""Parallel degrees and the batch arithmetic, validated once.

``world = dp × tp × pp``. Ranks in one tensor/pipeline group see the same rows, so only ``dp``
splits the data: each optimizer step consumes ``global_batch_size = micro_batch_size × grad_accum
× dp`` rows, split into ``dp × grad_accum`` micro-batches (the trainer's
``megakto.data.packing.plan_micro_batches``); data-parallel rank ``r`` owns micro-batches
``r*grad_accum .. r*grad_accum + grad_accum - 1``.

Pure arithmetic: no torch.distributed here, so every check runs before any process group exists.
"""

from dataclasses import dataclass

from megakto.errors import ConfigError

__all__ = ["ParallelDims"]


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    global_batch_size: int
    micro_batch_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "global_batch_size", "micro_batch_size", "tp", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ParallelDims.{name} must be a positive int, got {value!r}")
        model_parallel = self.tp * self.pp
        if self.world_size % model_parallel:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by tp × pp = {self.tp} × {self.pp} "
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
                f"= {rows_per_micro_step} (world {self.world_size} = dp {self.dp} × tp {self.tp} × "
                f"pp {self.pp}); use a multiple of {rows_per_micro_step} such as {hint}"
            )

    def describe(self) -> str:
        return (f"world {self.world_size} = dp {self.dp} × tp {self.tp} × pp {self.pp}; global batch "
                f"{self.global_batch_size} = micro {self.micro_batch_size} × grad-accum {self.grad_accum} × dp {self.dp}")

    @classmethod
    def from_config(cls, cfg, world_size: int, *, tp: int = 1, pp: int = 1) -> "ParallelDims":
        """Degrees for ``cfg.train``'s batch sizes on ``world_size`` processes."""
        return cls(
            world_size=world_size,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            tp=tp,
            pp=pp,
        )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches in one global batch, over all data-parallel ranks."""
        return self.dp * self.grad_accum
