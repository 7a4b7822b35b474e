"""Memory planning: how many bytes a run holds per rank and per node, before it runs.

Pure arithmetic (:mod:`~megakto.planning.states`, :mod:`~megakto.planning.activations`,
:mod:`~megakto.planning.plan`) over a model's shape (:mod:`megakto.model.shape`, filled from a
config.json on the meta device by :mod:`megakto.model.meta`); :mod:`~megakto.planning.run_plan`
reads a command line's config through the run's own checks; :mod:`~megakto.planning.accuracy` holds
the planner's stated accuracy (the worst error over the held-out calibration grid).
"""

from megakto.planning.accuracy import STATED_ACCURACY_PERCENT, accuracy_note
from megakto.planning.activations import Tokens
from megakto.planning.plan import GIB, MemoryPlan, PlanInputs, plan_memory
from megakto.planning.report import format_plan, plan_json
from megakto.model.shape import ModelShape

__all__ = ["STATED_ACCURACY_PERCENT", "accuracy_note", "Tokens", "GIB", "MemoryPlan", "PlanInputs", "plan_memory",
           "format_plan", "plan_json", "ModelShape"]
