"""Where a run's wall time goes after start-up: the steps, each evaluation and its eval samples, and
the final phase (last evaluation, samples, checkpoint, export), so that a part that costs more than
the training around it shows up in the log and in TensorBoard (``time/*`` scalars)."""

from __future__ import annotations

import time
from contextlib import contextmanager

__all__ = ["RunClock"]


class RunClock:
    """Seconds per part since training began (:meth:`start`): ``step``, ``eval``, ``samples``;
    :meth:`part` times a named part of the final phase."""

    def __init__(self):
        self.started = time.perf_counter()
        self.totals = {"step": 0.0, "eval": 0.0, "samples": 0.0}
        self.steps = 0
        self.first_step: float | None = None  # seconds of the first step this run took
        self.final: dict[str, float] = {}

    def start(self) -> None:
        self.started = time.perf_counter()

    @contextmanager
    def timed(self, part: str):
        """Add the ``with`` block's seconds to ``part`` (``step``, ``eval`` or ``samples``)."""
        before = self.totals[part]
        with _adding(self.totals, part):
            yield
        if part == "step":
            self.steps += 1
            if self.first_step is None:
                self.first_step = self.totals[part] - before

    def final_part(self, name: str):
        """Add the ``with`` block's seconds to the final phase's part ``name``."""
        return _adding(self.final, name)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def evaluation(self, step: int, eval_s: float, samples_s: float | None) -> tuple[str, dict[str, float]]:
        """The log line and ``time/*`` scalars of the evaluation at ``step`` that took ``eval_s``
        (and ``samples_s`` for its samples; None: no samples)."""
        elapsed = max(self.elapsed(), 1e-9)
        step_s = self.totals["step"] / self.steps if self.steps else None
        scalars = {"time/eval_s": eval_s, "time/eval_share": self.totals["eval"] / elapsed}
        if step_s is not None:
            scalars["time/step_s"] = step_s
        line = f"evaluation at step {step}: {eval_s:.2f} s"
        if samples_s is not None:
            scalars.update({"time/samples_s": samples_s, "time/samples_share": self.totals["samples"] / elapsed})
            line += f", samples {samples_s:.2f} s"
        line += f"; a step takes {step_s:.2f} s (mean of {self.steps})" if self.steps else "; no step yet"
        line += f"; since training began {elapsed:.1f} s, of it evaluations {100 * scalars['time/eval_share']:.1f}%"
        if samples_s is not None:
            line += f", samples {100 * scalars['time/samples_share']:.1f}%"
        return line, scalars

    def steps_summary(self) -> str:
        """``steps: 60 in 12.6 s: the first 0.45 s, then 0.20 s each (mean of 59)``"""
        if not self.steps:
            return "steps: none run"
        line = f"steps: {self.steps} in {self.totals['step']:.1f} s: the first {self.first_step:.2f} s"
        if self.steps > 1:
            rest = (self.totals["step"] - self.first_step) / (self.steps - 1)
            line += f", then {rest:.2f} s each (mean of {self.steps - 1})"
        return line

    def final_summary(self) -> str:
        """``final phase 2.1 s: evaluation 0.4 s, samples 0.2 s, checkpoint 1.3 s (of it hashing 0.2 s)``"""
        parts = [f"{k} {v:.1f} s" for k, v in self.final.items() if k != "hashing"]
        if "hashing" in self.final and "checkpoint" in self.final:
            i = list(k for k in self.final if k != "hashing").index("checkpoint")
            parts[i] += f" (of it hashing {self.final['hashing']:.1f} s)"
        total = sum(v for k, v in self.final.items() if k != "hashing")
        return f"final phase {total:.1f} s: " + ", ".join(parts)


@contextmanager
def _adding(totals: dict[str, float], key: str):
    begin = time.perf_counter()
    try:
        yield
    finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - begin
