"""How one KTO step is executed, per parallel mode, behind one interface (:class:`StepRunner`).

The trainer (megakto/trainer.py) is the algorithm: plan, no-grad pass, KL reduce, policy pass,
metrics. A runner owns the policy engine's execution of the two passes:

* :class:`~megakto.runners.zero.ZeroRunner`: ZeRO 0-3 and tensor parallelism; one forward per
  micro-batch, ``backward`` and ``step`` per micro-batch as DeepSpeed's engine expects.
* :class:`~megakto.runners.pipeline.PipelineRunner`: ``deepspeed.pipe``; the no-grad passes through
  ``eval_batch`` and the policy pass as one ``train_batch`` (1F1B schedule), eq. (7) evaluated on
  the last stage.
"""

from megakto.runners.base import StepRunner, TrainOutcome

__all__ = ["StepRunner", "TrainOutcome"]
