"""Tensor parallelism (DeepSpeed AutoTP, parallel.tp_size=2) against single-process runs, under
the real launcher on CPU (gloo), fp32.

* TP2 with ZeRO-3 and the online ZeRO-3 reference, 6 steps with evaluation and export: the loss
  and KL of every step, the eval metrics and the final weights equal the single-process run's; the
  demo learns; the exported folder gives the TP1 export's logits and the engine's own.
* TP2 × DP2 on 4 ranks (ZeRO-3): each TP group gets identical micro-batches, the DP ranks split the
  step's rows, every rank holds the same KL and metrics, and the weights after 3 steps equal the
  single-process run's step-3 checkpoint.
* TP2 with ZeRO-1 (its checkpoint joins back into exactly the engine's weights); TP2 with ZeRO-2
  and ``ref.mode=cache``, whose precompute is written by one rank per TP group and equals the
  policy's own log-probs at step 1 (policy = reference there).
* kill -9 of a TP2 run, then ``train.resume=auto``: the resumed steps and final weights are
  bitwise those of the uninterrupted run.
"""

import json
import sys
import os
import subprocess

import pytest
import torch

from megakto.checkpoint import probe_batch, read_weights
from tests.e2e._parallel_checks import close_weights, jsonl, kill_and_resume, same_steps
from tests.e2e.conftest import LONG, run_trainer
from tests.launcher import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TP2 = {"parallel.tp_size": 2}


def _weights(out):
    return torch.load(os.path.join(out, "dump", "policy.pt"), weights_only=True)


@pytest.fixture(scope="module")
def single(single_long):
    return single_long


@pytest.fixture(scope="module")
def tp2(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    proc, result = run_trainer(assets, out, nproc=2, **LONG, **TP2, **{"data.eval_files": assets["eval"]})
    result["log"] = proc.stdout + proc.stderr
    return out, result


def test_tp2_zero3_equals_single_process(single, tp2):
    (s_out, s), (t_out, t) = single, tp2
    assert t["world_size"] == 2
    same_steps(t, s, 6, kl_abs=1e-5)
    assert [step for step, _ in t["eval"]] == [step for step, _ in s["eval"]] == [0, 3, 6]
    for (_, a), (_, b) in zip(t["eval"], s["eval"]):
        for key in ("loss", "kl", "rewards/margins", "reward_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    close_weights(_weights(t_out), _weights(s_out))
    # Both ranks of the TP group computed every metric themselves, from the same reductions.
    per_rank = [jsonl(os.path.join(t_out, "dump", f"metrics_rank{r}.jsonl")) for r in (0, 1)]
    assert [m["kl"] for m in per_rank[0]] == [m["kl"] for m in per_rank[1]]
    assert [m["loss"] for m in per_rank[0]] == [m["loss"] for m in per_rank[1]]
    # The reference stayed frozen through AutoTP's split of both engines.
    assert t["ref_max_change"] == 0.0 and t["shared_storages"] == 0
    # model.vocab_block_rows=auto (the default) is off under TP, and the log says so.
    assert "vocabulary blocks: off under tensor parallelism" in t["log"]
    assert "parallelism: world 2 = dp 1 × tp 2 × pp 1" in t["log"]


def test_tp2_demo_learns(tp2):
    _, t = tp2
    hist, evals = t["history"], t["eval"]
    assert hist[0]["loss"] == pytest.approx(0.5, abs=1e-6) and hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert sum(h["loss"] for h in hist[-3:]) / 3 < sum(h["loss"] for h in hist[:3]) / 3 - 0.001
    assert sum(h["rewards/margins"] for h in hist[-3:]) > sum(h["rewards/margins"] for h in hist[:3])
    assert evals[0][1]["reward_accuracy"] == pytest.approx(0.5)
    assert evals[-1][1]["reward_accuracy"] > 0.75 and evals[-1][1]["rewards/margins"] > 0.01


def test_tp2_export_equals_tp1_export_and_the_engine(single, tp2):
    from transformers import AutoModelForCausalLM

    logits = {}
    for name, (out, _) in (("tp1", single), ("tp2", tp2)):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf")).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=probe_batch(model.config.vocab_size)).logits
        engine_logits = torch.load(os.path.join(out, "dump", "logits.pt"), weights_only=True)
        assert float((logits[name] - engine_logits).abs().max()) <= 1e-6, name
    assert float((logits["tp2"] - logits["tp1"]).abs().max()) <= 1e-5
    # The checkpoint holds one set of ZeRO-3 files per TP rank, and its manifest says so.
    tag = os.path.join(tp2[0], "checkpoints", "step-00000006")
    names = os.listdir(tag)
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_01_model_states.pt"} <= set(names)
    with open(os.path.join(tag, "complete")) as f:
        assert json.load(f)["tp_size"] == 2


def test_zero_to_hf_check_on_a_tp_checkpoint(tp2, tmp_path):
    out, _ = tp2
    proc = subprocess.run([sys.executable, "tools/zero_to_hf.py", os.path.join(out, "checkpoints"),
                           str(tmp_path / "hf"), "--tag", "step-00000003", "--check"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: max abs logit diff" in proc.stdout and "(ok," in proc.stdout


def test_tp2_dp2_four_ranks(assets, single, tmp_path):
    s_out, s = single
    _, t = run_trainer(assets, tmp_path, nproc=4, **TP2, **{"train.max_steps": 3, "data.eval_files": assets["eval"],
                                                             "train.eval_every": 3, "train.eval_batch_size": 30})
    assert t["world_size"] == 4
    same_steps(t, s, 3, kl_abs=1e-5)
    # Evaluation split over the 2 DP ranks, summed over the DP group only: the single process's numbers.
    assert [step for step, _ in t["eval"]] == [0, 3]
    for (_, a), (_, b) in zip(t["eval"], s["eval"][:2]):
        for key in ("loss", "kl", "rewards/margins", "reward_accuracy", "pairs"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    want = read_weights(os.path.join(s_out, "checkpoints", "step-00000003"))
    close_weights(_weights(tmp_path), want)
    micro = [jsonl(os.path.join(tmp_path, "dump", f"micro_rank{r}.jsonl")) for r in range(4)]
    assert micro[0] == micro[1] and micro[2] == micro[3]  # TP groups {0,1}, {2,3}
    for step in range(3):  # DP ranks 0 and 2 split the step's 16 rows between them
        rows = [i for mb in micro[0][step] + micro[2][step] for i in mb]
        assert sorted(rows) == list(range(16))
    metrics = [jsonl(os.path.join(tmp_path, "dump", f"metrics_rank{r}.jsonl")) for r in range(4)]
    for r in (1, 2, 3):
        assert [m["kl"] for m in metrics[r]] == [m["kl"] for m in metrics[0]]
        assert [m["loss"] for m in metrics[r]] == [m["loss"] for m in metrics[0]]


def test_tp2_zero1(assets, single, tmp_path):
    """3 steps then the final save, which joins back into exactly the engine's weights."""
    (s_out, s), ds = single, "ds_configs/zero1.json"
    _, t = run_trainer(assets, tmp_path, nproc=2, ds=ds, **TP2, **{"train.max_steps": 3, "train.export_hf": "true"})
    same_steps(t, s, 3, kl_abs=1e-5)
    close_weights(_weights(tmp_path), read_weights(os.path.join(s_out, "checkpoints", "step-00000003")))
    # The ZeRO-1/2 TP checkpoint (mp_rank_0X model files, one optimizer file per TP rank) joins back
    # into exactly the engine's weights.
    names = os.listdir(tmp_path / "checkpoints" / "step-00000003")
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= set(names)
    joined = read_weights(str(tmp_path / "checkpoints" / "step-00000003"))
    engine_weights = _weights(tmp_path)
    assert sorted(joined) == sorted(engine_weights)
    assert all(torch.equal(joined[k], engine_weights[k]) for k in joined)


def test_tp2_zero2_cached_reference(assets, tmp_path):
    """At step 1 the policy is the reference, so the implicit rewards β·(log πθ − cached log πref) of
    both classes and the KL estimate are 0 exactly when the TP-computed cache holds the right
    full-vocabulary log-probs (one shard's log-softmax would be off by log 2 per token)."""
    _, t = run_trainer(assets, tmp_path, nproc=2, ds="ds_configs/zero2.json", **TP2,
                       **{"train.max_steps": 3, "ref.mode": "cache", "ref.cache_dir": str(tmp_path / "cache")})
    first = t["history"][0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["loss"] == pytest.approx(0.5, abs=1e-7)
    assert first["logps/chosen"] < -1.0  # real log-probs, so equal rewards say something
    assert t["history"][2]["loss"] != first["loss"] and t["history"][2]["kl"] > 0  # training moved it
    # One data-parallel rank: the TP group computed every row together and its rank 0 wrote them once.
    shards = sorted(n for n in os.listdir(tmp_path / "cache") if n.startswith("shard-"))
    assert shards == ["shard-rank0-0.safetensors"], shards


def test_tp2_kill9_resume_is_bitwise(assets, tp2, tmp_path):
    """Kill rank 1 (SIGKILL) while both ranks wait to start step 5 (step 3 is the newest
    checkpoint), resume with train.resume=auto: steps 4-6 and the final weights are bitwise those
    of the uninterrupted TP2 run. Evaluation and export are off here: they do not touch the state."""
    quiet = {"train.eval_every": 0, "train.export_hf": "false"}
    out, resumed = kill_and_resume(assets, tmp_path, ds="ds_configs/zero3.json", settings={**LONG, **TP2, **quiet},
                                   kill_before_step=5)
    assert "step-00000003 at step 3" in open(tmp_path / "dumpB" / "launcher.log").read()
    t_out, t = tp2
    assert resumed["indices"] == t["indices"][3:]
    assert len(resumed["history"]) == 3
    for got, want in zip(resumed["history"], t["history"][3:]):
        for key in ("loss", "kl", "grad_norm", "rewards/margins"):
            assert got[key] == want[key], key
    want = _weights(t_out)
    got = torch.load(tmp_path / "dumpB" / "policy.pt", weights_only=True)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
