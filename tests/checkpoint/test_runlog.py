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


def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path, monkeypatch, capsys):
    """On a terminal: step/total, loss, KL, tokens/s and tqdm's time left; not on one: no bar, and
    every message is a plain line; a warning is a line and a TensorBoard text entry."""
    import io
    import sys

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    log = RunLogger(str(tmp_path / "a"), enabled=True, total_steps=10)
    log.advance(1, loss=0.49, kl=0.125, tok_s=1234.5)
    log._bar.refresh()
    shown = tty.getvalue()
    assert "1/10" in shown and "loss=0.49" in shown and "kl=0.125" in shown and "tok_s=1234" in shown
    assert "<" in shown  # elapsed<remaining
    log.close()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file
    log = RunLogger(str(tmp_path / "b"), enabled=True, total_steps=10)
    assert log._bar.disable
    log.advance(1, loss=0.5, kl=0.0, tok_s=1.0)
    log.warning("the KL estimate rose", step=1)
    log.close()
    out = capsys.readouterr().out
    assert out.endswith("] warning: the KL estimate rose\n") and out.startswith("[megakto ")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "b" / "tensorboard"))
    acc.Reload()
    [event] = acc.Tensors("health/text_summary")
    assert (event.step, event.tensor_proto.string_val[0].decode()) == (1, "the KL estimate rose")
