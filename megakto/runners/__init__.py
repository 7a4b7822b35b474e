"""How one KTO step is executed, per parallel mode, behind one interface (:class:`StepRunner`).

The trainer (megakto/trainer.py) is the algorithm: plan, no-grad pass, KL reduce, policy pass,
metrics. A runner owns the policy engine's execution of the two passes:

* :class:`~megakto.runners.zero.ZeroRunner`: ZeRO 0-3 and tensor parallelism; one forward per
  micro-batch, ``backward`` and ``step`` per micro-batch as DeepSpeed's engine expects.
* :class:`~megakto.runners.pipeline.PipelineRunner`: ``deepspeed.pipe``; the no-grad passes through
  ``eval_batch`` and the policy pass as one ``train_batch`` (1F1B schedule), eq. (7) evaluated on
  the last stage.
* :class:`~megakto.runners.expert.ExpertMode`: DeepSpeed's AutoEP, each MoE layer's experts split
  over ``parallel.ep_size`` data-parallel ranks; the ZeRO runner, every forward in lockstep.
* :class:`~megakto.runners.sequence.SequenceMode`: Ulysses sequence parallelism under ZeRO-3; the
  ZeRO runner, each rank scoring its shard of every micro-batch's tokens.

Each mode is a module that builds itself (:class:`~megakto.runners.base.ParallelMode`: its policy
engine, groups, online reference and feature switches); :func:`parallel_mode` is the one place
that picks a mode from the mesh. A new mode (expert or sequence parallelism) is a new module here
and a line in :func:`parallel_mode`.
"""

from megakto.runners.base import EngineOutcome, ModeSetup, ParallelMode, StepRunner, TrainOutcome
from megakto.runners.expert import ExpertMode
from megakto.runners.pipeline import PipelineMode
from megakto.runners.sequence import SequenceMode
from megakto.runners.zero import ZeroMode

__all__ = ["EngineOutcome", "ModeSetup", "ParallelMode", "StepRunner", "TrainOutcome", "parallel_mode"]


def parallel_mode(setup: ModeSetup) -> ParallelMode:
    """The mode of ``setup.dims``: pipelines when it has pipeline stages, Ulysses when it has
    sequence-parallel ranks, AutoEP when it has expert-parallel ranks, else ZeRO (with AutoTP when
    it has tensor-parallel ranks)."""
    dims = setup.dims
    mode = (PipelineMode if dims.pp > 1 else SequenceMode if dims.sp > 1 else ExpertMode if dims.ep > 1
            else ZeroMode)
    return mode(setup)
