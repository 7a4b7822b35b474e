"""Pipeline parallelism (deepspeed.pipe, parallel.pp_size=2, ZeRO-1) against single-process runs,
under the real launcher on CPU (gloo), fp32.

* PP2 with the online reference (a second, frozen pipeline), 6 steps with evaluation, checkpoints
  and the HF export: the loss and KL of every step, the eval metrics and the weights of every
  checkpoint equal the single-process run's; the demo learns; the export loads with
  ``from_pretrained`` and gives the single-process export's logits; ``tools/zero_to_hf.py --check``
  converts the per-layer checkpoint.
* PP2 × DP2 on 4 ranks (online reference), and PP2 and PP2 × DP2 with ``ref.mode=cache`` (the
  precompute runs through the pipeline, split over the pipelines): each pipeline's stages see the
  same micro-batches, the pipelines split the step's rows, and loss, KL and the step-3 weights
  equal a single-process run's with the same reference mode.
* kill -9 of one rank of a PP2 run, then ``train.resume=auto``: the resumed steps and the final
  weights are bitwise those of the uninterrupted run.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megakto.checkpoint import probe_batch, read_weights
from tests.e2e._parallel_checks import close_weights, jsonl, kill_and_resume, same_steps
from tests.e2e.conftest import LONG, run_trainer
from tests.launcher import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PP2 = {"parallel.pp_size": 2}
ZERO1 = "ds_configs/zero1.json"


def _ckpt(out, step):
    return read_weights(os.path.join(out, "checkpoints", f"step-{step:08d}"))


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    """One process, ZeRO-1 as the pipeline runs (ZeRO-3's other reduction order moves the KL by ~1e-6)."""
    out = tmp_path_factory.mktemp("single_zero1")
    _, result = run_trainer(assets, out, nproc=1, ds=ZERO1, **LONG, **{"data.eval_files": assets["eval"]})
    return out, result


@pytest.fixture(scope="module")
def pp2(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp2")
    proc, result = run_trainer(assets, out, nproc=2, ds=ZERO1, **LONG, **PP2, **{"data.eval_files": assets["eval"]})
    result["log"] = proc.stdout + proc.stderr
    return out, result


def test_pp2_equals_single_process(single, pp2):
    (s_out, s), (p_out, p) = single, pp2
    assert p["world_size"] == 2
    same_steps(p, s, 6)
    assert [step for step, _ in p["eval"]] == [step for step, _ in s["eval"]] == [0, 3, 6]
    for (_, a), (_, b) in zip(p["eval"], s["eval"]):
        for key in ("loss", "kl", "rewards/margins", "reward_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    for step in (3, 6):
        close_weights(_ckpt(p_out, step), _ckpt(s_out, step))
    # Both stages computed every metric from the same reductions.
    per_rank = [jsonl(os.path.join(p_out, "dump", f"metrics_rank{r}.jsonl")) for r in (0, 1)]
    assert [m["kl"] for m in per_rank[0]] == [m["kl"] for m in per_rank[1]]
    assert [m["loss"] for m in per_rank[0]] == [m["loss"] for m in per_rank[1]]
    assert "parallelism: world 2 = dp 1 × tp 1 × pp 2" in p["log"]
    assert "pipeline: stage 0: layers 0-1; stage 1: layers 2-4" in p["log"]  # embed+layer | layer+norm+head
    assert "vocabulary blocks: off under pipeline parallelism" in p["log"]


def test_pp2_demo_learns(pp2):
    _, p = pp2
    hist, evals = p["history"], p["eval"]
    assert hist[0]["loss"] == pytest.approx(0.5, abs=1e-6) and hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert sum(h["loss"] for h in hist[-3:]) / 3 < sum(h["loss"] for h in hist[:3]) / 3 - 0.001
    assert evals[0][1]["reward_accuracy"] == pytest.approx(0.5)
    assert evals[-1][1]["reward_accuracy"] > 0.75 and evals[-1][1]["rewards/margins"] > 0.01


def test_pp2_checkpoint_and_export(single, pp2, tmp_path):
    from transformers import AutoModelForCausalLM

    (s_out, _), (p_out, _) = single, pp2
    tag = os.path.join(p_out, "checkpoints", "step-00000006")
    names = set(os.listdir(tag))
    # One file per pipeline layer (embedding, 2 decoder layers, norm, head), one engine state per stage.
    assert {f"layer_0{i}-model_states.pt" for i in range(5)} <= names
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= names
    with open(os.path.join(tag, "complete")) as f:
        assert json.load(f)["pp_size"] == 2
    logits = {}
    for name, out in (("single", s_out), ("pp2", p_out)):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf")).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=probe_batch(model.config.vocab_size)).logits
    assert float((logits["pp2"] - logits["single"]).abs().max()) <= 1e-5
    proc = subprocess.run([sys.executable, "tools/zero_to_hf.py", os.path.join(p_out, "checkpoints"),
                           str(tmp_path / "hf"), "--tag", "step-00000003", "--check"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: max abs logit diff" in proc.stdout and "(ok," in proc.stdout


CACHE = {"train.max_steps": 3, "ref.mode": "cache", "checkpoint.every_steps": 3}


@pytest.fixture(scope="module")
def single_cache(assets, tmp_path_factory):
    """One process, ZeRO-1, the reference cache (fixed dataset-level KL rows), 3 steps."""
    out = tmp_path_factory.mktemp("single_cache")
    _, result = run_trainer(assets, out, nproc=1, ds=ZERO1, **CACHE, **{"ref.cache_dir": str(out / "cache")})
    return out, result


def _split_over_two_pipelines(out):
    micro = [jsonl(os.path.join(out, "dump", f"micro_rank{r}.jsonl")) for r in range(4)]
    assert micro[0] == micro[2] and micro[1] == micro[3]  # pipelines {0,2}, {1,3}
    for step in range(3):  # the two pipelines split the step's 16 rows between them
        rows = [i for mb in micro[0][step] + micro[1][step] for i in mb]
        assert sorted(rows) == list(range(16))
    metrics = [jsonl(os.path.join(out, "dump", f"metrics_rank{r}.jsonl")) for r in range(4)]
    for r in (1, 2, 3):
        assert [m["kl"] for m in metrics[r]] == [m["kl"] for m in metrics[0]]
        assert [m["loss"] for m in metrics[r]] == [m["loss"] for m in metrics[0]]


def test_pp2_dp2_online_reference(assets, single, tmp_path):
    s_out, s = single
    _, p = run_trainer(assets, tmp_path, nproc=4, ds=ZERO1, **PP2, **{"train.max_steps": 3, "checkpoint.every_steps": 3})
    assert p["world_size"] == 4 and p["reference_loaded"]
    same_steps(p, s, 3)
    close_weights(_ckpt(tmp_path, 3), _ckpt(s_out, 3))
    _split_over_two_pipelines(tmp_path)


@pytest.mark.parametrize("nproc", [2, 4], ids=["pp2", "pp2xdp2"])
def test_pp2_cached_reference(assets, single_cache, tmp_path, nproc):
    """The precompute runs through the pipeline (split over the pipelines when dp is 2); the first
    stage of each pipeline writes its share; training then never loads the reference."""
    s_out, s = single_cache
    _, p = run_trainer(assets, tmp_path, nproc=nproc, ds=ZERO1, **CACHE, **PP2,
                       **{"ref.cache_dir": str(tmp_path / "cache")})
    assert p["world_size"] == nproc and not p["reference_loaded"] and p["precompute_seconds"] > 0
    same_steps(p, s, 3)
    close_weights(_ckpt(tmp_path, 3), _ckpt(s_out, 3))
    shards = sorted(n for n in os.listdir(tmp_path / "cache") if n.startswith("shard-"))
    assert shards == ["shard-rank0-0.safetensors", "shard-rank1-0.safetensors"][:nproc // 2], shards
    if nproc == 4:
        _split_over_two_pipelines(tmp_path)


def test_pp2_kill9_resume_is_bitwise(assets, pp2, tmp_path):
    """Kill the last stage (SIGKILL) while both ranks wait to start step 5 (step 3 is the newest
    checkpoint), resume with train.resume=auto: steps 4-6 and the final weights are bitwise those of
    the uninterrupted PP2 run. Evaluation and export are off here: they do not touch the state."""
    quiet = {"train.eval_every": 0, "train.export_hf": "false"}
    out, resumed = kill_and_resume(assets, tmp_path, ds=ZERO1, settings={**LONG, **PP2, **quiet}, kill_before_step=5)
    assert "step-00000003 at step 3" in open(tmp_path / "dumpB" / "launcher.log").read()
    p_out, p = pp2
    assert resumed["indices"] == p["indices"][3:]
    for got, want in zip(resumed["history"], p["history"][3:], strict=True):
        for key in ("loss", "kl", "grad_norm", "rewards/margins"):
            assert got[key] == want[key], key
    got, want = _ckpt(out, 6), _ckpt(p_out, 6)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
