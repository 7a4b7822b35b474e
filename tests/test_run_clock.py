"""Where a run's time goes (megakto/run_clock.py): the evaluation line and scalars, the final phase."""

import pytest

from megakto.run_clock import RunClock


def test_evaluation_line_and_shares_by_hand():
    """10 steps of 2 s, evaluations 1.5 s, samples 0.5 s in all, 25 s since training began: a step
    2.00 s, evaluations 6% and samples 2% of the run."""
    clock = RunClock()
    clock.totals.update(step=20.0, eval=1.5, samples=0.5)
    clock.steps = 10
    clock.elapsed = lambda: 25.0
    line, scalars = clock.evaluation(10, 0.75, 0.25)
    assert scalars == pytest.approx({"time/eval_s": 0.75, "time/step_s": 2.0, "time/eval_share": 0.06,
                                     "time/samples_s": 0.25, "time/samples_share": 0.02})
    assert line == ("evaluation at step 10: 0.75 s, samples 0.25 s; a step takes 2.00 s (mean of 10); since "
                    "training began 25.0 s, of it evaluations 6.0%, samples 2.0%")


def test_final_phase_names_each_part_and_the_hashing_inside_the_checkpoint():
    clock = RunClock()
    clock.final.update(evaluation=0.4, samples=0.25, checkpoint=1.26, hashing=0.31, export=0.5)
    assert clock.final_summary() == ("final phase 2.4 s: evaluation 0.4 s, samples 0.2 s, checkpoint 1.3 s "
                                     "(of it hashing 0.3 s), export 0.5 s")


def test_steps_summary_separates_the_first_step():
    clock = RunClock()
    with clock.timed("step"):
        pass
    clock.totals["step"], clock.first_step, clock.steps = 12.6, 0.45, 60
    assert clock.steps_summary() == "steps: 60 in 12.6 s: the first 0.45 s, then 0.21 s each (mean of 59)"
