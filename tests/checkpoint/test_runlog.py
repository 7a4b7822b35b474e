"""TensorBoard after a resume, read back with TensorBoard's own loader: a run logs steps 1-6 and
dies (its checkpoint is step 4), the resumed run logs 5-8. The loader must show 1-8 once each,
step 4 being the crashed run's and 5-8 the resumed run's."""

import time

import pytest

from megakto.runlog import RunLogger


def _losses(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("loss")]


@pytest.mark.parametrize("checkpoint_step", [4, 1])
def test_resume_keeps_the_checkpoint_step_and_purges_later_ones(tmp_path, checkpoint_step):
    crashed = RunLogger(str(tmp_path), enabled=True, total_steps=8)
    for step in range(1, 7):
        crashed.scalars(step, {"loss": float(step)})
    crashed.close()
    time.sleep(1.1)  # event files are named by the second they were opened
    resumed = RunLogger(str(tmp_path), enabled=True, total_steps=8, initial_step=checkpoint_step)
    for step in range(checkpoint_step + 1, 9):
        resumed.scalars(step, {"loss": 100.0 + step})
    resumed.close()
    expected = [(s, float(s)) for s in range(1, checkpoint_step + 1)] + \
               [(s, 100.0 + s) for s in range(checkpoint_step + 1, 9)]
    assert _losses(str(tmp_path / "tensorboard")) == expected
