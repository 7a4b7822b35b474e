"""The interface between the trainer's algorithm and a parallel mode's execution.

A mode (a module of its own: :mod:`~megakto.runners.zero`, :mod:`~megakto.runners.pipeline`) builds
itself behind :class:`ParallelMode`: its policy engine, its process groups, its online reference and
its feature switches; its :class:`StepRunner` runs the two passes of a step and reports what the
engine did as an :class:`EngineOutcome`. The trainer never branches on a parallel degree and never
reads an engine attribute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol, Sequence

import torch

from megakto.config import Config
from megakto.data.batcher import Batcher
from megakto.distributed.parallel import ParallelDims
from megakto.kto.router_aux import RouterBalance
from megakto.metrics import StepSums

__all__ = ["Pairs", "MicroLoss", "LossFn", "EngineOutcome", "EngineWatch", "TrainOutcome", "StepRunner", "ModeSetup",
           "ParallelMode", "SAMPLES_OFF", "model_of"]

# Why generated eval samples are off under tensor and pipeline parallelism (either mode's answer).
SAMPLES_OFF = ("eval samples: off under tensor and pipeline parallelism (generation needs the whole output head on "
               "one rank); set train.eval_samples=0 to silence this")

Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]


def model_of(engine) -> torch.nn.Module:
    """The module an engine runs (the HF model, its LoRA wrapper, or this rank's pipeline stages)."""
    return engine.module


class MicroLoss(NamedTuple):
    """One micro-batch's loss as the trainer defines it: ``loss`` (a sum over its rows, to be
    back-propagated), the per-row ``losses``, ``rewards`` and sigmoid ``slopes`` (detached, for
    metrics; no slopes for SFT), which rows are desirable, and the router's balancing loss and
    expert loads when ``loss`` includes them."""

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor
    slopes: torch.Tensor | None = None
    router: RouterBalance | None = None


# (micro-batch position in this rank's list, its policy log-probs (S,)[, the router's balance of its
# forward]) -> MicroLoss. A runner passes the third argument when it asked the forward for router
# logits (kto.router_aux_coef > 0), and only then.
LossFn = Callable[..., MicroLoss]


@dataclass(frozen=True)
class EngineOutcome:
    """What the policy engine did with a step: the learning rate the update used, the global
    gradient norm (None: no optimizer step ran, or the engine did not compute one) and whether the
    engine discarded the update (DeepSpeed's overflow check: a non-finite global gradient norm)."""

    lr: float
    grad_norm: float | None = None
    skipped: bool = False


class EngineWatch:
    """Reads a DeepSpeed engine around one optimizer step: the rate before, the norm and the skipped
    count after. DeepSpeed's ZeRO optimizers discard a step whose global gradient norm is not finite
    (fp32 and bf16, stages 1-3, unless bf16.check_grad_overflow is off); the overflow is all-reduced,
    so every rank sees the same count."""

    def __init__(self, engine):
        self._engine = engine
        self.lr = engine.get_lr()[0]  # the rate this step's update uses
        self._skipped_before = engine.skipped_steps

    def outcome(self, backwards: int) -> EngineOutcome:
        """``backwards``: backward passes that reached the engine (0: no optimizer step ran)."""
        if not backwards:
            return EngineOutcome(self.lr)
        grad_norm = self._engine.get_global_grad_norm()
        return EngineOutcome(self.lr, None if grad_norm is None else float(grad_norm),
                             self._engine.skipped_steps > self._skipped_before)


@dataclass
class TrainOutcome:
    """What the policy pass did: the metric sums of the micro-batches it ran (on the ranks that hold
    them; :meth:`StepRunner.reduce_sums` totals them), how many backward passes reached the engine,
    whether a non-finite loss was back-propagated (``poisoned``: DeepSpeed's overflow check must then
    discard the step), why the step is skipped (None: applied) and the engine's outcome."""

    sums: StepSums = field(default_factory=StepSums)
    backwards: int = 0
    poisoned: bool = False
    skipped: str | None = None
    engine: EngineOutcome | None = None


class StepRunner(Protocol):
    engine: object  # the policy's DeepSpeed engine

    def score(self, batches: list[Pairs]) -> list[torch.Tensor]:
        """Policy log-probs without grad: one (len(pairs),) tensor per batch, on every rank."""
        ...

    def train(self, batches: list[Pairs], loss_fn: LossFn, *, scale: float, skipped: str | None) -> TrainOutcome:
        """Forward and backward of every micro-batch (``loss_fn`` gives each one's loss from its
        log-probs; ``scale`` turns the summed losses into the gradient of the global mean) and the
        optimizer step at the end. ``skipped``: already known not to apply (non-finite z_ref):
        nothing runs. Sets the outcome's ``engine``."""
        ...

    def reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """The step's metric sums over every rank that holds rows, each row counted once."""
        ...


@dataclass
class ModeSetup:
    """What a mode builds from: the validated config (``model.attn_implementation`` and
    ``model.logps`` resolved), the mesh (groups not yet attached), the filled-in DeepSpeed config,
    the models' dtype and the run's log."""

    cfg: Config
    dims: ParallelDims
    ds_config: dict
    dtype: torch.dtype
    log: Callable[[str], None]


class ParallelMode(Protocol):
    """One parallel mode, built from a :class:`ModeSetup`. The trainer calls, in order:
    :meth:`switch_features` (before anything loads), :meth:`build_policy`, :meth:`attach_groups`,
    :meth:`runner`, :meth:`check_packing`, then :meth:`online_reference` (zero or more times: the
    reference cache's precompute and the run's online reference) and :meth:`samples_off`."""

    def switch_features(self) -> None:
        """Turn off what this mode does not combine with (in the config, before any model loads), logged."""
        ...

    def build_policy(self, load_dir: str | None):
        """The policy's DeepSpeed engine, in train mode; ``load_dir``: the checkpoint it will load."""
        ...

    def attach_groups(self, policy) -> ParallelDims:
        """The mesh with the engine's groups attached, checked against the mesh arithmetic."""
        ...

    def runner(self, policy, dims: ParallelDims, *, batcher: Batcher, logps_fn: Callable) -> StepRunner:
        """The runner of the policy's passes; ``batcher`` turns each micro-batch's pairs into model input."""
        ...

    def check_packing(self, policy, logps_fn: Callable, tokenizer, *, device) -> None:
        """The start-up check that packed rows score as alone, or why it does not apply (logged)."""
        ...

    def online_reference(self, runner: StepRunner, *, batcher: Batcher, logps_fn: Callable):
        """The frozen reference weights, run every step (a :class:`~megakto.reference.scorers.Reference`)."""
        ...

    def samples_off(self) -> str | None:
        """The line to log when ``train.eval_samples`` cannot run in this mode (None: it can)."""
        ...
