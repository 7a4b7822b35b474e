"""The planner's stated accuracy: the worst |error| of its peak per rank over the held-out calibration
grid (``tools/calibration_grid.json``: 2-rank CPU runs on shapes the planner was never tuned on,
measured by ``tools/calibrate_memory.py --grid``; the table is in docs/planning.md#calibration).

The grid's points are self-describing (shape, DeepSpeed JSON, overrides, measured bytes), so
:func:`grid_errors` re-predicts each with the current planner, runs nothing, and a unit test holds
:data:`STATED_ACCURACY_PERCENT` to the worst error rounded up: a planner change that moves it fails
until the grid's table and this figure are updated together.
"""

from __future__ import annotations

import json
import math
import os

from megakto.model.shape import ModelShape, MoeShape

__all__ = ["STATED_ACCURACY_PERCENT", "CALIBRATION_DOC", "GRID_FILE", "accuracy_note", "predict_point",
           "grid_errors", "stated_percent"]

# The worst |predicted / measured - 1| of the dry run's plan over the grid's live-peak points
# (MALLOC_MMAP_THRESHOLD_=1048576), in percent, rounded up.
STATED_ACCURACY_PERCENT = 14
CALIBRATION_DOC = "docs/planning.md#calibration"
GRID_FILE = os.path.join("tools", "calibration_grid.json")


def accuracy_note() -> str:
    """What every printed plan says after its peak."""
    return f"±{STATED_ACCURACY_PERCENT} % measured on CPU, see {CALIBRATION_DOC}"


def _shape(fields: dict) -> ModelShape:
    moe = fields.get("moe")
    return ModelShape(**{**fields, "layer_params": tuple(fields["layer_params"]),
                         "other_params": tuple(fields.get("other_params", ())),
                         "moe": None if moe is None else MoeShape(**{**moe, "expert_params": tuple(moe["expert_params"])})})


def predict_point(point: dict, *, with_data: bool = True) -> int:
    """The current planner's peak per rank (CPU) for one grid point, from the point alone: the dry run's
    plan (``with_data``: for the largest micro-batch of the run's steps, from its data), else the plan
    without data (the worst micro-batch the config allows)."""
    from megakto.planning.activations import Tokens
    from megakto.planning.run_plan import PlanRequest, make_plan

    overrides = ("model.path=calibration-shape", "data.train_files=unused", f"model.logps={point['logps']}",
                 *point["overrides"])
    tokens = Tokens(*point["dry_run_tokens"]) if with_data else None
    req = PlanRequest(None, point["deepspeed"], overrides, point["world_size"], on_gpu=False, tokens=tokens)
    return make_plan(req, _shape(point["model_shape"]), ds=point["ds_config"])[1].peak_bytes_per_rank


def grid_errors(path: str, *, live_only: bool = True, with_data: bool = True) -> list[tuple[str, int, float, float]]:
    """(name, predicted, measured, error) of every point of the grid file at ``path``; ``live_only``:
    the points measured under the documented allocator setting (the others measure RSS with glibc's
    retained heap in it); ``with_data``: the dry run's plan (else the plan without data)."""
    with open(path) as fh:
        points = json.load(fh)["points"]
    out = []
    for point in points:
        if live_only and not isinstance(point["allocator"], dict):
            continue
        predicted = predict_point(point, with_data=with_data)
        out.append((point["name"], predicted, point["measured_bytes"], predicted / point["measured_bytes"] - 1))
    return out


def stated_percent(errors: list[tuple[str, int, float, float]]) -> int:
    """The worst |error| in percent, rounded up."""
    return math.ceil(max(abs(e[3]) for e in errors) * 100 - 1e-9)
