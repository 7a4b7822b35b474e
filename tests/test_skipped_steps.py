"""megakto.skipped_steps: the counting and stopping rule for skipped optimizer steps (pure)."""

import pytest

from megakto.errors import MegaktoError
from megakto.skipped_steps import SkippedSteps, TooManySkippedSteps

GRAD = "non-finite gradient norm (inf), update discarded by DeepSpeed"


def test_warns_once_counts_all_and_stops_at_the_limit():
    s = SkippedSteps(3, hint="optim.lr=0.0003, kto.beta=1e+38")
    assert s.record(1, None) is None
    warning = s.record(2, GRAD)
    assert warning.startswith("warning: step 2 skipped, weights not updated: " + GRAD)
    assert "kto.beta=1e+38" in warning and "optim.lr=0.0003" in warning and "rows" in warning
    assert "train.max_skipped_steps=3" in warning
    assert (s.total, s.consecutive) == (1, 1)
    assert s.record(3, "non-finite loss") is None  # the warning comes once per run, not per skip
    with pytest.raises(TooManySkippedSteps) as err:
        s.record(4, "non-finite loss")
    assert isinstance(err.value, MegaktoError)
    assert str(err.value) == (
        "3 consecutive optimizer steps skipped (steps 2-4, last: non-finite loss); stopped at "
        "train.max_skipped_steps=3 without saving, the last checkpoint is as it was; lower optim.lr "
        "or kto.beta, or look for bad rows")
    assert "\n" not in str(err.value)
    assert (s.total, s.consecutive) == (3, 3)


def test_an_applied_step_resets_the_run_but_not_the_total():
    s = SkippedSteps(2)
    assert s.record(1, GRAD) is not None
    assert s.record(2, None) is None
    assert (s.total, s.consecutive) == (1, 0)
    assert s.record(3, GRAD) is None  # second skip of the run: counted, no second warning
    assert s.record(4, None) is None
    assert s.record(5, GRAD) is None
    with pytest.raises(TooManySkippedSteps, match=r"2 consecutive optimizer steps skipped \(steps 5-6"):
        s.record(6, GRAD)
    assert s.total == 4


def test_limit_one_stops_at_the_first_skip_and_zero_never_stops():
    with pytest.raises(TooManySkippedSteps, match=r"1 consecutive optimizer steps skipped \(step 7, last"):
        SkippedSteps(1).record(7, GRAD)
    never = SkippedSteps(0)
    assert "never stops" in never.record(1, GRAD)
    for step in range(2, 50):
        assert never.record(step, GRAD) is None
    assert (never.total, never.consecutive) == (49, 49)


def test_negative_limit_is_refused():
    with pytest.raises(ValueError):
        SkippedSteps(-1)


def _through_a_checkpoint(state, tmp_path):
    """``state`` as a resume reads it back: torch.save, then a ``weights_only`` load."""
    import torch

    torch.save(state, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)


def test_the_counts_continue_across_a_resume(tmp_path):
    """Steps 1-5 (skips at 2, 4 and 5) saved, a new counter loads them: step 6's skip is the third in
    a row (steps 4-6) and the fourth of the run, as without the interruption."""
    s = SkippedSteps(3)
    for step, reason in enumerate([None, GRAD, None, GRAD, GRAD], start=1):
        s.record(step, reason)
    state = _through_a_checkpoint(s.state_dict(), tmp_path)
    assert state == {"total": 3, "consecutive": 2, "first_of_run": 4}
    resumed = SkippedSteps(3)
    resumed.load_state_dict(state)
    with pytest.raises(TooManySkippedSteps, match=r"^3 consecutive optimizer steps skipped \(steps 4-6, last"):
        resumed.record(6, GRAD)
    assert (resumed.total, resumed.consecutive) == (4, 3)
    applied = SkippedSteps(3)
    applied.load_state_dict({"total": 3, "consecutive": 0, "first_of_run": None})
    assert applied.record(6, GRAD) is None  # not the run's first skip: no second warning
    assert (applied.total, applied.consecutive, applied.first_of_run) == (4, 1, 6)
