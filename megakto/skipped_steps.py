"""Counting optimizer steps that left the weights unchanged because something was not finite.

A step is skipped when its loss or its KL reference point is NaN/inf (megakto sees it before the
backward and does not run one), or when its global gradient norm is (DeepSpeed's ZeRO optimizer
then discards the gradient). A skipped step trains nothing, so a run that skips every step would
otherwise finish, save and exit 0 having learnt nothing. This object holds the decision: a warning
at the first skip, an error after ``max_consecutive`` skips in a row. It is fed values every rank
already agrees on (all-reduced flags, DeepSpeed's all-reduced overflow), so all ranks decide alike.
Pure: no torch, no process group.
"""

from __future__ import annotations

from megakto.errors import MegaktoError

__all__ = ["SkippedSteps", "TooManySkippedSteps"]


class TooManySkippedSteps(MegaktoError):
    """``train.max_skipped_steps`` consecutive steps were skipped; the run stops without saving."""


class SkippedSteps:
    def __init__(self, max_consecutive: int, *, hint: str = ""):
        """``max_consecutive``: stop after this many skips in a row; 0 = never stop. ``hint``: the
        run's settings worth naming in the warning (e.g. ``optim.lr=0.0003, kto.beta=1e+38``)."""
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.hint = hint
        self.total = 0
        self.consecutive = 0
        self.first_of_run: int | None = None  # first step of the current run of skips

    def record(self, step: int, reason: str | None) -> str | None:
        """Account for optimizer step ``step`` (1-based); ``reason`` is None when it was applied.
        Returns a warning to print at the first skipped step of the run, else None; raises
        :class:`TooManySkippedSteps` at the ``max_consecutive``-th skip in a row."""
        if reason is None:
            self.consecutive, self.first_of_run = 0, None
            return None
        self.total += 1
        self.consecutive += 1
        if self.first_of_run is None:
            self.first_of_run = step
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            steps = f"steps {self.first_of_run}-{step}" if step != self.first_of_run else f"step {step}"
            raise TooManySkippedSteps(
                f"{self.consecutive} consecutive optimizer steps skipped ({steps}, last: {reason}); "
                f"stopped at train.max_skipped_steps={self.max_consecutive} without saving, the last "
                f"checkpoint is as it was; lower optim.lr or kto.beta, or look for bad rows")
        if self.total == 1:
            settings = f" ({self.hint})" if self.hint else ""
            stop = (f"the run stops after train.max_skipped_steps={self.max_consecutive} in a row"
                    if self.max_consecutive else "train.max_skipped_steps=0: the run never stops for this")
            return (f"warning: step {step} skipped, weights not updated: {reason}. Likely causes: a learning "
                    f"rate or kto.beta too large{settings}, rows with extreme log-probs, or non-finite weights; {stop}")
        return None

    def state_dict(self) -> dict:
        """The counts a resume continues from (plain types, for the trainer state)."""
        return {"total": self.total, "consecutive": self.consecutive, "first_of_run": self.first_of_run}

    def load_state_dict(self, state: dict) -> None:
        """Continue the counts of :meth:`state_dict`; the limit and hint stay this run's."""
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])
        self.first_of_run = None if state["first_of_run"] is None else int(state["first_of_run"])
