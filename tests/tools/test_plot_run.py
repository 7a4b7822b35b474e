"""tools/plot_run.py on TensorBoard events written the way RunLogger writes them: one PNG per
panel, several runs on one figure, panels nobody logged skipped, a folder without events refused."""

import os

import pytest
from torch.utils.tensorboard import SummaryWriter

from tests.launcher import load_script

# matplotlib builds its font cache on first use by running fc-list (a second process).
pytestmark = pytest.mark.gloo

plot_run = load_script("tools/plot_run.py", "megakto_tools_plot_run")

PNG = b"\x89PNG\r\n\x1a\n"


def _run(path, *, kto=True, steps=6):
    with SummaryWriter(os.path.join(path, "tensorboard")) as w:
        for step in range(1, steps + 1):
            w.add_scalar("loss", 0.5 - 0.01 * step, step)
            w.add_scalar("kl", 0.1 * step, step)
            if kto:
                w.add_scalar("rewards/chosen", 0.02 * step, step)
                w.add_scalar("rewards/rejected", -0.02 * step, step)
                w.add_scalar("rewards/margins", 0.04 * step, step)
                w.add_scalar("kl/raw", 0.1 * step - 0.3, step)
                w.add_scalar("kl/z_ref", 0.01 * step, step)
                w.add_scalar("kto/slope/chosen", 1 - 0.05 * step, step)
                w.add_scalar("kto/slope/rejected", 1 - 0.04 * step, step)
        if kto:
            for step, acc in ((0, 0.5), (steps, 0.9)):
                w.add_scalar("eval/reward_accuracy", acc, step)
    return str(path)


def test_one_run_gives_every_panel(tmp_path, capsys):
    run = _run(tmp_path / "kto_run")
    assert plot_run.main([run]) == 0
    names = sorted(os.listdir(os.path.join(run, "plots")))
    assert names == ["eval_reward_accuracy.png", "kl.png", "loss.png", "margin.png", "rewards.png", "slopes.png"]
    for name in names:
        with open(os.path.join(run, "plots", name), "rb") as f:
            data = f.read()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert capsys.readouterr().out.splitlines() == [os.path.join(run, "plots", n) for n in
                                                     ["loss.png", "kl.png", "rewards.png", "slopes.png",
                                                      "margin.png", "eval_reward_accuracy.png"]]


def test_runs_compared_and_missing_panels_skipped(tmp_path, capsys):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "sft", kto=False)
    written = plot_run.plot_runs([b], str(tmp_path / "only_sft"))
    assert [os.path.basename(p) for p in written] == ["loss.png", "kl.png"]
    out = capsys.readouterr().out
    assert "plot_run: skipped rewards.png: no run logged rewards/chosen, rewards/rejected, kl/z_ref" in out
    assert "plot_run: skipped slopes.png: no run logged kto/slope/chosen, kto/slope/rejected" in out
    assert "plot_run: skipped eval_reward_accuracy.png: no run logged eval/reward_accuracy" in out
    assert plot_run.main([a, b, "--out", str(tmp_path / "both")]) == 0
    assert len(os.listdir(tmp_path / "both")) == 6  # a logged every panel; b shares loss and kl


def test_a_folder_without_events_is_one_line(tmp_path, capsys):
    assert plot_run.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"plot_run: error: {tmp_path}: no tensorboard folder; pass a run's output_dir\n"
