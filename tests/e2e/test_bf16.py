"""bf16 end to end on CPU (``model.dtype=bfloat16``, what ``auto`` means on a GPU): every parallel
mode trained under the real launcher against its fp32 twin, 2 ranks each.

* ZeRO-1, ZeRO-2, ZeRO-3, TP2 (ZeRO-3), PP2 (ZeRO-1) and LoRA (ZeRO-3), 3 steps and a checkpoint
  each; ZeRO-3 with the optimizer offloaded (ds_configs/zero3_offload_optimizer.json) and the
  reference cache, 4 steps, checkpoints at 2 and 4 and the HF export, then killed (kill -9) before
  step 3 and resumed.
* Each run: loss, KL, rewards, log-probs and gradient norm of every step against the fp32 twin
  within the tolerance derived in :func:`_tolerances`; the engine's optimizer and gradient-sum dtype
  are the precision policy's (fp32 under ZeRO-3, bf16 under ZeRO-1/2 and pipelines:
  megakto.distributed.ds_config); every save passes ``checkpoint.verify`` (checksums and the pickle
  allow-list, which bf16 saves of every layout here pass unchanged: audit F13) and records bfloat16.
* Step 1, where the policy is the reference: on CPU the target rows' rewards are exactly 0 and the
  loss exactly 0.5 (same kernels on the same bf16 weights and rows); see :func:`_step_one`.
* The cache run: the export is a bf16 folder that loads and gives the engine's logits bitwise;
  ``tools/zero_to_hf.py --check`` converts its bf16 checkpoint; the resumed steps and final weights
  are bitwise the uninterrupted bf16 run's.

The fp32 twins are recorded numbers, as the golden losses are (an fp32 run on CPU repeats itself
bitwise): the same settings with ``model.dtype=float32``. ZeRO-1, ZeRO-2, TP2 and PP2 share the
ZeRO-3 twin: their own fp32 runs agree with it to 4e-6 on every metric compared here (measured),
under a thousandth of the tightest tolerance.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megakto import checkpoint
from tests.e2e._parallel_checks import kill_and_resume
from tests.e2e.conftest import run_trainer
from tests.e2e.test_modes import CACHE_GOLDEN_KLS, CACHE_GOLDEN_LOSSES
from tests.e2e.test_train import GOLDEN_KLS, GOLDEN_LOSSES
from tests.launcher import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

BF16 = {"model.dtype": "bfloat16"}
KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm")
U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits
BETA = 0.1  # kto.beta's default, which these runs keep

# fp32 twins, per step: KEYS in order.
FP32_ZERO3 = [  # ZeRO-3, 2 ranks, 3 steps: the run of test_train.py's GOLDEN_LOSSES
    (0.5, 0.0, 0.0, 0.0, -64.08046913146973, -68.73678588867188, 0.2710195535127558),
    (0.5010986626148224, 0.0, -0.02433347748592496, -0.01554112481244374, -72.1044921875, -64.1636734008789,
     0.20822546651335813),
    (0.4973110109567642, 0.20436596870422363, 0.030974388122558594, 0.009457683190703392, -66.86649322509766,
     -73.16850471496582, 0.19930891441204418),
]
FP32_CACHE = [  # ZeRO-3, optimizer offload, reference cache, 4 steps: test_modes.py's CACHE_GOLDEN_* run
    (0.4999999925494194, 0.0, 4.7683716530855236e-08, 0.0, -64.08047008514404, -68.73678779602051,
     0.2710195481777191),
    (0.5010986775159836, 0.0, -0.024333477718755603, -0.015541315544396639, -72.10449028015137, -64.1636734008789,
     0.20822548866271973),
    (0.49731095135211945, 0.1666710376739502, 0.030974531080573797, 0.009457780746743083, -66.86649322509766,
     -73.16850471496582, 0.19932439923286438),
    (0.4967635050415993, 0.1154782772064209, 0.043406867422163486, 0.017491912934929132, -71.42743682861328,
     -68.54509544372559, 0.19701525568962097),
]
FP32_LORA = [  # LoRA r 8, alpha 16, lr 3e-3, ZeRO-3, 3 steps
    (0.5, 0.0, 0.0, 0.0, -64.08046913146973, -68.73678588867188, 0.06701570458869435),
    (0.5011718273162842, 0.0, -0.016462611500173807, -0.007084846496582031, -72.02578353881836, -64.07911014556885,
     0.05699362083282664),
    (0.49755921214818954, 0.5924220085144043, 0.06946449354290962, 0.04993486369494349, -66.48159408569336,
     -72.76373481750488, 0.04789255070481306),
]

LORA = {"model.lora.r": 8, "model.lora.alpha": 16.0, "optim.lr": 3e-3}
ZERO1, ZERO3 = "ds_configs/zero1.json", "ds_configs/zero3.json"
# case: (DeepSpeed JSON, settings, fp32 twin, the engine's optimizer, its gradient-sum dtype)
CASES = {
    "zero1": (ZERO1, {}, FP32_ZERO3, "DeepSpeedZeroOptimizer", "bfloat16"),
    "zero2": ("ds_configs/zero2.json", {}, FP32_ZERO3, "DeepSpeedZeroOptimizer", "bfloat16"),
    "zero3": (ZERO3, {}, FP32_ZERO3, "DeepSpeedZeroOptimizer_Stage3", "float32"),
    "tp2": (ZERO3, {"parallel.tp_size": 2}, FP32_ZERO3, "DeepSpeedZeroOptimizer_Stage3", "float32"),
    "pp2": (ZERO1, {"parallel.pp_size": 2}, FP32_ZERO3, "DeepSpeedZeroOptimizer", "bfloat16"),
    "lora": (ZERO3, LORA, FP32_LORA, "DeepSpeedZeroOptimizer_Stage3", "float32"),
}


def test_twins_are_the_golden_runs():
    """The recorded twins are the runs whose losses and KLs the fp32 golden tests check."""
    assert [t[0] for t in FP32_ZERO3] == pytest.approx(GOLDEN_LOSSES, abs=2e-5)
    assert [t[1] for t in FP32_ZERO3] == pytest.approx(GOLDEN_KLS, abs=2e-4)
    assert [t[0] for t in FP32_CACHE[:3]] == pytest.approx(CACHE_GOLDEN_LOSSES, abs=2e-5)
    assert [t[1] for t in FP32_CACHE[:3]] == pytest.approx(CACHE_GOLDEN_KLS, abs=2e-5)


def _shortest_completion(assets) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    with open(assets["train"]) as f:
        completions = [json.loads(line)["completion"] for line in f]
    return min(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions)


def _tolerances(twin: dict, metrics: dict, n: int) -> dict:
    """How far a bf16 step's metrics may be from the fp32 twin's, by a model of bf16 rounding.

    u = 2^-8. A token's log-prob in the bf16 run differs from the fp32 run's by rounding errors of
    rms u·(|log p_t| + 1): one bf16 rounding of a number the size of the log-prob plus a nat (the
    scale of the logits it comes from: the start-up packing check's per-token bound, with one
    rounding instead of its worst-case 8), independent from token to token. A metric that is the
    mean over m sequences of n-token sums S, with |log p_t| ~ |S|/n (this model's tokens start near
    log 512 each), then has sigma = u·(|S|/sqrt(n) + sqrt(n))/sqrt(m); n is the demo's shortest
    completion (fewer tokens, larger sigma: conservative). Each tolerance is 4 sigma (|z| > 4 has
    probability 6e-5 for a Gaussian):

    * logps/chosen, logps/rejected: 4·sigma(S, m_chosen or m_rejected);
    * rewards = beta·(log pi - log pi_ref), two independent errors: beta·sqrt(2)·4·sigma;
    * KL: the mean log-ratio of the m_chosen + m_rejected KL rows (the same completions under other
      prompts, so |S| of the larger of the two means): sqrt(2)·4·sigma(S, m);
    * loss: a row's loss lambda·(1 - sigmoid(z)) moves by at most lambda/4 per unit of
      z = reward - beta·KL (lambda = 1 here): (tol_rewards + beta·tol_KL) / 4;
    * grad_norm: relative 8u, the packing check's 8 roundings per element (a gradient off by at
      most 8u·|g| elementwise has a norm off by at most 8u·||g||).

    The model is of rounding at fixed weights; after 3-4 steps of Adam the two trajectories have
    separated too, by less (measured: every difference below 15 % of its tolerance, the largest
    LoRA's step-3 logps/rejected, below 12 % without LoRA). The tolerances are tight enough to
    fail a bf16 run that stops learning (step 3's fp32 rewards/chosen is 0.031, its tolerance
    0.021) and a KL or a batch's mean log-prob off by more than 0.16 nats."""
    def sigma4(s: float, m: float) -> float:
        return 4 * U * (abs(s) / math.sqrt(n) + math.sqrt(n)) / math.sqrt(m)

    m_c, m_r = metrics["count/chosen"], metrics["count/rejected"]
    tol = {"logps/chosen": sigma4(twin["logps/chosen"], m_c), "logps/rejected": sigma4(twin["logps/rejected"], m_r)}
    tol["rewards/chosen"] = BETA * math.sqrt(2) * tol["logps/chosen"]
    tol["rewards/rejected"] = BETA * math.sqrt(2) * tol["logps/rejected"]
    tol["kl"] = math.sqrt(2) * sigma4(max(abs(twin["logps/chosen"]), abs(twin["logps/rejected"])), m_c + m_r)
    tol["loss"] = (max(tol["rewards/chosen"], tol["rewards/rejected"]) + BETA * tol["kl"]) / 4
    tol["grad_norm"] = 8 * U * twin["grad_norm"]
    return tol


def _against_twin(history: list[dict], twin: list[tuple], n: int) -> float:
    """Asserts every step's KEYS within tolerance of the twin's; returns the largest |diff| / tol."""
    assert len(history) == len(twin)
    worst = 0.0
    for step, (got, want) in enumerate(zip(history, twin), start=1):
        want = dict(zip(KEYS, want))
        for key, tol in _tolerances(want, got, n).items():
            diff = abs(got[key] - want[key])
            assert diff <= tol, f"step {step} {key}: bf16 {got[key]!r}, fp32 {want[key]!r}, |diff| {diff:.3g} > {tol:.3g}"
            worst = max(worst, diff / tol)
    return worst


def _step_one(first: dict, n: int, *, exact: bool) -> None:
    """Step 1: the policy is the reference. The reference scores the target and KL rows in one
    packed forward, the policy in separate ones, so in bf16 a sequence's log-prob can round
    differently in the two. On CPU (the same kernels and bf16 weights in both) the target rows come
    out the same to the bit under ZeRO-1/2/3, pipelines and LoRA: rewards exactly 0, loss exactly
    0.5 (``exact``). The KL rows do not (kl/raw -5.8e-5 here, clamped to a KL of 0); nor, under
    TP2, the target rows (|rewards| ~1e-5: AutoTP's layers, cause not pinned down), nor a cache
    filled in another packing layout (~3e-6): those are held to the tolerance. On a GPU none of it
    is exact (atomic index_add, nondeterministic attention backward: audit F14)."""
    if exact:
        assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0 and first["loss"] == 0.5
    else:
        tol = _tolerances(first, first, n)
        assert abs(first["rewards/chosen"]) <= tol["rewards/chosen"]
        assert abs(first["rewards/rejected"]) <= tol["rewards/rejected"]
    assert abs(first["kl/raw"]) <= _tolerances(first, first, n)["kl"]


def _saves_verify(out) -> list[str]:
    """Every checkpoint of the run passes checkpoint.verify and records bfloat16; returns the tags."""
    ckpts = os.path.join(out, "checkpoints")
    tags = sorted(t for t in os.listdir(ckpts) if t.startswith("step-"))
    assert tags
    for tag in tags:
        path = os.path.join(ckpts, tag)
        assert checkpoint.verify(path, collective=False) is None, tag
        assert checkpoint.read_manifest(path)["dtype"] == "bfloat16", tag
    return tags


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_against_fp32_twin(assets, tmp_path, case):
    ds, settings, twin, optimizer, accum = CASES[case]
    _, result = run_trainer(assets, tmp_path, nproc=2, ds=ds, **BF16, **settings,
                            **{"train.max_steps": 3, "checkpoint.every_steps": 3})
    n = _shortest_completion(assets)
    assert (result["optimizer"], result["grad_accum_dtype"]) == (optimizer, accum)
    history = result["history"]
    _against_twin(history, twin, n)
    _step_one(history[0], n, exact=case != "tp2")
    assert history[2]["rewards/chosen"] > history[2]["rewards/rejected"] > 0  # learning, as the fp32 twin
    assert _saves_verify(tmp_path) == ["step-00000003"]


# ZeRO-3 with the optimizer offloaded and the reference cache: the twin of FP32_CACHE.
CACHE_RUN = {**BF16, "train.max_steps": 4, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
             "ref.mode": "cache"}
OFFLOAD = "ds_configs/zero3_offload_optimizer.json"


@pytest.fixture(scope="module")
def cache_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_cache")
    _, result = run_trainer(assets, out, nproc=2, ds=OFFLOAD, **CACHE_RUN,
                            **{"ref.cache_dir": str(out / "cache"), "train.export_hf": "true"})
    return out, result


def test_cache_and_offload_against_fp32_twin(assets, cache_run):
    out, result = cache_run
    n = _shortest_completion(assets)
    assert result["precompute_seconds"] > 0 and not result["reference_loaded"]
    assert (result["optimizer"], result["grad_accum_dtype"]) == ("DeepSpeedZeroOptimizer_Stage3", "float32")
    _against_twin(result["history"], FP32_CACHE, n)
    _step_one(result["history"][0], n, exact=False)
    assert _saves_verify(out) == ["step-00000002", "step-00000004"]


def test_bf16_export_loads_and_is_the_engine(cache_run):
    """train.export_hf writes the manifest's dtype: a bf16 folder whose weights are the engine's
    bitwise and whose logits on export's probe batch are the engine's bitwise (same CPU kernels)."""
    from transformers import AutoModelForCausalLM

    from megakto.checkpoint import probe_batch

    out, _ = cache_run
    weights = load_file(os.path.join(out, "hf", "model.safetensors"))
    policy = torch.load(os.path.join(out, "dump", "policy.pt"), weights_only=True)
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert set(weights) == set(policy) and all(torch.equal(weights[k], policy[k]) for k in policy)
    with open(os.path.join(out, "hf", "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf")).eval()
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=probe_batch(model.config.vocab_size)).logits
    assert torch.equal(logits.float(), torch.load(os.path.join(out, "dump", "logits.pt"), weights_only=True))


def test_zero_to_hf_check_on_a_bf16_checkpoint(cache_run, tmp_path):
    """tools/zero_to_hf.py --check: the newest bf16 checkpoint (ZeRO-3, optimizer offloaded)
    converts, in bf16, to exactly the run's own export."""
    out, _ = cache_run
    proc = subprocess.run([sys.executable, "tools/zero_to_hf.py", os.path.join(out, "checkpoints"),
                           str(tmp_path / "hf"), "--check"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step-00000004" in proc.stdout and "check: max abs logit diff 0 (ok" in proc.stdout
    converted = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(os.path.join(out, "hf", "model.safetensors"))
    assert set(converted) == set(exported)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, exported[k]) for k, v in converted.items())


def test_kill9_resume_is_bitwise_in_bf16(assets, cache_run, tmp_path):
    """Killed (SIGKILL of rank 1) before step 3, resumed from the step-2 checkpoint (bf16 weights,
    fp32 master and Adam state offloaded, fp32 gradient sum): steps 3-4 and the final weights are
    the uninterrupted bf16 run's, bit for bit. The cache is the uninterrupted run's."""
    want_out, want = cache_run
    settings = {**CACHE_RUN, "ref.cache_dir": str(want_out / "cache")}
    out, resumed = kill_and_resume(assets, tmp_path, ds=OFFLOAD, settings=settings, kill_before_step=3)
    assert resumed["precompute_seconds"] == 0
    assert resumed["indices"] == want["indices"][2:]
    for got, exp in zip(resumed["history"], want["history"][2:], strict=True):
        for key in KEYS + ("rewards/margins", "kl/raw"):
            assert got[key] == exp[key], key
    got = torch.load(tmp_path / "dumpB" / "policy.pt", weights_only=True)
    exp = torch.load(os.path.join(want_out, "dump", "policy.pt"), weights_only=True)
    assert sorted(got) == sorted(exp) and all(torch.equal(got[k], exp[k]) for k in exp)
    assert _saves_verify(out) == ["step-00000002", "step-00000004"]
