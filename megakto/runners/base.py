"""The interface between the trainer's algorithm and a parallel mode's execution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol, Sequence

import torch

from megakto.metrics import StepSums

__all__ = ["Pairs", "MicroLoss", "LossFn", "TrainOutcome", "StepRunner"]

Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]


class MicroLoss(NamedTuple):
    """One micro-batch's loss as the trainer defines it: ``loss`` (a sum over its rows, to be
    back-propagated), the per-row ``losses``, ``rewards`` and sigmoid ``slopes`` (detached, for
    metrics; no slopes for SFT), and which rows are desirable."""

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor
    slopes: torch.Tensor | None = None


# (micro-batch position in this rank's list, its policy log-probs (S,)) -> MicroLoss
LossFn = Callable[[int, torch.Tensor], MicroLoss]


@dataclass
class TrainOutcome:
    """What the policy pass did: the metric sums of the micro-batches it ran (on the ranks that hold
    them; :meth:`StepRunner.reduce_sums` totals them), how many backward passes reached the engine,
    whether a non-finite loss was back-propagated (``poisoned``: DeepSpeed's overflow check must then
    discard the step) and why the step is skipped (None: applied)."""

    sums: StepSums = field(default_factory=StepSums)
    backwards: int = 0
    poisoned: bool = False
    skipped: str | None = None


class StepRunner(Protocol):
    engine: object  # the policy's DeepSpeed engine

    def score(self, batches: list[Pairs]) -> list[torch.Tensor]:
        """Policy log-probs without grad: one (len(pairs),) tensor per batch, on every rank."""
        ...

    def train(self, batches: list[Pairs], loss_fn: LossFn, *, scale: float, skipped: str | None) -> TrainOutcome:
        """Forward and backward of every micro-batch (``loss_fn`` gives each one's loss from its
        log-probs; ``scale`` turns the summed losses into the gradient of the global mean) and the
        optimizer step at the end. ``skipped``: already known not to apply (non-finite z_ref):
        nothing runs."""
        ...

    def reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """The step's metric sums over every rank that holds rows, each row counted once."""
        ...
