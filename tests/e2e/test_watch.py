"""Watching a run: a learning rate that collapses both rewards (the issue's "calm log, chance
accuracy" run: rewards of both classes to about -10, the KL estimate clamped at 0, the gradient
norm near 0, the loss at 0.500) is named while it happens, in the log and as TensorBoard text;
tools/plot_run.py draws the finished run from its events."""

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import run_trainer
from tests.launcher import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _texts(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


@pytest.fixture(scope="module")
def collapsing(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("collapse")
    proc, result = run_trainer(assets, out, nproc=1, **{
        "optim.lr": 3e-2, "train.max_steps": 16, "train.micro_batch_size": 8, "health.window": 8,
        "health.warmup_steps": 10, "data.eval_files": assets["eval"], "train.eval_every": 8,
        "train.eval_batch_size": 60, "train.eval_samples": 2})
    return out, result, proc.stdout + proc.stderr


def test_collapsing_rewards_are_warned_with_the_fix(collapsing):
    out, result, log = collapsing
    last = result["history"][-1]
    assert last["rewards/chosen"] < -5 and last["rewards/rejected"] < -5 and last["grad_norm"] < 1e-3
    warnings = [line.split("warning: ", 1)[1] for line in log.splitlines() if "] warning: " in line]
    falling = [w for w in warnings if w.startswith("rewards of desirable and undesirable completions both fell")]
    assert len(falling) == 1 and falling[0].endswith("lower optim.lr, raise kto.beta, or add kto.sft_weight")
    saturated = [w for w in warnings if w.startswith("the gradient norm fell to")]
    assert len(saturated) == 1 and "the sigmoids of eq. (7) are saturated" in saturated[0]
    # The same lines, at their steps, as TensorBoard text.
    texts = _texts(os.path.join(out, "tensorboard"), "health")
    assert sorted(t for _, t in texts) == sorted(w for w in warnings if not w.startswith("kto.desirable_weight"))
    assert all(0 < step <= 16 for step, _ in texts)


def test_samples_and_plots_of_the_run(collapsing, tmp_path):
    out, _, _ = collapsing
    import json

    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["step"] for s in samples] == [0, 0, 8, 8, 16, 16]  # train.eval_samples=2 per evaluation
    assert {s["prompt"] for s in samples[:2]} == {s["prompt"] for s in samples[-2:]}  # fixed prompts
    assert [s["reference"] for s in samples[:2]] == [s["reference"] for s in samples[-2:]]  # frozen
    assert [s["policy"] for s in samples[:2]] == [s["reference"] for s in samples[:2]]  # step 0: policy = reference
    assert _texts(os.path.join(out, "tensorboard"), "samples")[0][1].startswith("| prompt | policy | reference |")
    proc = subprocess.run([sys.executable, "tools/plot_run.py", str(out), "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["eval_reward_accuracy.png", "kl.png", "loss.png", "margin.png",
                                            "rewards.png", "slopes.png"]
