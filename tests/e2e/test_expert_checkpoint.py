"""Checkpoints of expert-parallel runs end to end (the trainer under the launcher, a tiny Qwen3-MoE,
parallel.ep_size=2 on 2 ranks, ZeRO-3, a checkpoint every 2 of 4 steps): a kill -9 resume
continues bitwise; the step-2 checkpoint resumed without expert parallelism (parallel.ep_size=1,
its universal form under Hugging Face names) continues within 1e-6; the export (train.export_hf,
and tools/zero_to_hf.py --check) loads with from_pretrained, nothing missing or unexpected, and
gives the engine's logits."""

import os
import subprocess
import sys

import pytest
import torch

from megakto._demo.data import write_demo_data
from megakto._demo.tiny_model import make_tiny_model
from tests.e2e._parallel_checks import kill_and_resume
from tests.e2e.conftest import run_trainer
from tests.launcher import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EP = {"parallel.ep_size": 2, "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.max_steps": 4,
      "checkpoint.every_steps": 2, "checkpoint.keep_last": 4, "train.eval_every": 0, "train.eval_samples": 0}
KEYS = ("loss", "kl", "grad_norm", "rewards/margins")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_checkpoint")
    train, _ = write_demo_data(root / "data", n_train_prompts=40, n_eval_prompts=4, seed=0)
    return {"model": str(make_tiny_model(root / "model", family="qwen3_moe", seed=0)), "train": str(train)}


@pytest.fixture(scope="module")
def straight(moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2_straight")
    _, result = run_trainer(moe, out, nproc=2, **EP, **{"train.export_hf": "true"})
    return out, result


def _weights(path):
    return torch.load(path, weights_only=True)


def test_ep2_kill9_resume_is_bitwise(moe, straight, tmp_path):
    """SIGKILL rank 1 while both ranks wait to start step 4 (step 2 is the newest checkpoint), resume
    with train.resume=auto: steps 3-4 and the final weights (experts gathered) are bitwise those of
    the uninterrupted run."""
    _, resumed = kill_and_resume(moe, tmp_path, ds="ds_configs/zero3.json", settings=EP, kill_before_step=4)
    assert "step-00000002 at step 2" in open(tmp_path / "dumpB" / "launcher.log").read()
    s_out, s = straight
    assert resumed["indices"] == s["indices"][2:] and len(resumed["history"]) == 2
    for got, want in zip(resumed["history"], s["history"][2:]):
        for key in KEYS:
            assert got[key] == want[key], key
    want, got = _weights(s_out / "dump" / "policy.pt"), _weights(tmp_path / "dumpB" / "policy.pt")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_ep2_checkpoint_resumes_without_expert_parallelism(moe, straight, tmp_path):
    """The EP2 step-2 checkpoint resumed by a run with parallel.ep_size=1 on 2 ranks: converted to
    its universal form under Hugging Face names, then steps 3-4 within 1e-6 of the EP2 run."""
    s_out, s = straight
    tag = s_out / "checkpoints" / "step-00000002"
    proc, result = run_trainer(moe, tmp_path / "ep1", nproc=2, **{**EP, "parallel.ep_size": 1},
                               **{"train.resume": str(tag)})
    log = proc.stdout + proc.stderr
    assert "universal-step-00000002 for 2 ranks" in log, log[-3000:]
    assert result["indices"] == s["indices"][2:] and len(result["history"]) == 2
    for got, want in zip(result["history"], s["history"][2:]):
        for key in ("loss", "kl", "rewards/margins"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    want, got = _weights(s_out / "dump" / "policy.pt"), _weights(tmp_path / "ep1" / "dump" / "policy.pt")
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=5e-6, msg=name)


def test_ep2_export_loads_and_matches_the_engine(straight, tmp_path):
    """output_dir/hf (train.export_hf) loads with from_pretrained, nothing missing or unexpected,
    experts under their Hugging Face names; its logits are the engine's (AutoEP's grouped matmuls
    against HF's per-expert loop: float rounding only). tools/zero_to_hf.py --check passes."""
    from transformers import AutoModelForCausalLM

    from megakto.checkpoint import probe_batch

    out, _ = straight
    model, info = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    names = dict(model.named_parameters())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.gate.weight" in names
    with torch.no_grad():
        logits = model.eval()(input_ids=probe_batch(model.config.vocab_size)).logits
    assert float((logits - _weights(out / "dump" / "logits.pt")).abs().max()) <= 1e-5
    proc = subprocess.run([sys.executable, "tools/zero_to_hf.py", os.path.join(out, "checkpoints"),
                           str(tmp_path / "hf"), "--check"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: max abs logit diff" in proc.stdout and "(ok" in proc.stdout
