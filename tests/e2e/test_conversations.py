"""End to end under the real launcher, 2 CPU processes over gloo, ZeRO-3: the sorting demo as
conversations (megakto/_demo/conversations.py). Each conversation asks for two sorts; its
undesirable twin breaks the rule in one turn. Row labels: the model must score every assistant
turn to tell the twins apart. Turn labels: one example per turn, and held-out reward accuracy over
the broken turns and their correct twins says whether it learned which turn broke the rule."""

import math

import pytest

from megakto._demo.conversations import write_conversation_data
from tests.e2e.conftest import run_trainer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _train(assets, tmp_path, **data_kwargs):
    train, eval_ = write_conversation_data(tmp_path / "data", n_train=400, n_eval=60, seed=0, **data_kwargs)
    _, result = run_trainer(assets, tmp_path / "out", nproc=2, **{
        "data.train_files": str(train), "data.eval_files": str(eval_), "data.max_length": 128,
        "kto.desirable_weight": "auto", "train.max_steps": 40, "train.eval_every": 20,
        "train.eval_batch_size": 40})
    return result


def _check(result):
    hist, evals = result["history"], result["eval"]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["kl"]) for h in hist)
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    assert [s for s, _ in evals] == [0, 20, 40]
    assert evals[0][1]["reward_accuracy"] == pytest.approx(0.5)
    assert evals[-1][1]["reward_accuracy"] >= 0.9
    assert evals[-1][1]["rewards/margins"] > evals[0][1]["rewards/margins"]


def test_a_conversational_task_is_learned_from_row_labels(assets, tmp_path):
    _check(_train(assets, tmp_path))


def test_turn_labels_teach_which_turn_broke_the_rule(assets, tmp_path):
    _check(_train(assets, tmp_path, turn_labels=True))
