"""Training modes under the launcher (2 ranks, ZeRO-3): packed + chunked log-probs equal the
padded full-logits path; the reference cache is filled once, reused without loading the reference,
and refused for other weights; the SFT baseline trains."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.e2e.conftest import base_overrides, run_trainer
from tests.launcher import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_packed_chunked_equals_padded_full(assets, tmp_path):
    """Same rows per step; losses, KL and rewards equal to fp32 tolerance over 3 steps, for the
    packed chunked path, the padded full-logits path and the vocabulary-blocked path."""
    _, packed = run_trainer(assets, tmp_path / "packed", nproc=2)
    _, padded = run_trainer(assets, tmp_path / "padded", nproc=2, **{"data.packing": "false", "model.logps": "full"})
    # and with the embedding and head split into vocabulary blocks (512 rows -> 100 x 5 + 12)
    _, blocked = run_trainer(assets, tmp_path / "blocked", nproc=2, **{"model.vocab_block_rows": 100})
    assert packed["indices"] == padded["indices"] == blocked["indices"]
    assert packed["history"][2]["kl"] > 0.01  # the KL term is in play by step 3
    for a, b, c in zip(packed["history"], padded["history"], blocked["history"]):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "kl/raw",
                    "kto/slope/chosen", "kto/slope/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
            assert c[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    _check_reference_point_metrics(packed["history"], beta=0.1)


def _check_reference_point_metrics(history, *, beta):
    """The reference-point scalars agree with the KL the loss used: kl = max(0, kl/raw),
    kl/z_ref = beta * kl, kl/clamped = [kl/raw < 0], kl/raw_change = |step-to-step change|."""
    first = history[0]  # the policy is the reference: every log-ratio is 0, every sigmoid at z = 0
    assert first["kl/raw"] == pytest.approx(0.0, abs=1e-5)
    assert first["kto/slope/chosen"] == pytest.approx(1.0, abs=1e-9) and first["kto/slope/rejected"] == pytest.approx(1.0, abs=1e-9)
    assert "kl/raw_change" not in first
    for prev, h in zip([None, *history], history):
        assert h["kl"] == pytest.approx(max(0.0, h["kl/raw"]), rel=1e-6, abs=1e-7)
        assert h["kl/z_ref"] == pytest.approx(beta * h["kl"], rel=1e-6, abs=1e-8)
        assert h["kl/clamped"] == float(h["kl/raw"] < 0)
        assert 0 < h["kto/slope/rejected"] <= 1 and 0 < h["kto/slope/chosen"] <= 1
        if prev is not None:
            assert h["kl/raw_change"] == pytest.approx(abs(h["kl/raw"] - prev["kl/raw"]), rel=1e-12)
    assert any(h["kl/raw"] != 0 for h in history)  # the policy moved: the check is not of zeros only


# Cache mode on 2 ranks, as made by the implementation that held every sequence as Python lists
# (before keys and lengths moved to numpy and token ids to on-demand reads): the same numbers.
CACHE_GOLDEN_LOSSES = [0.5, 0.5010986775159836, 0.49731094390153885]
CACHE_GOLDEN_KLS = [0.0, 0.0, 0.1666710376739502]
CACHE_GOLDEN_EVAL = {"loss": 0.4983866401714697, "kl": 0.20160697400569916, "reward_accuracy": 0.8833333333333333}


def test_reference_cache(assets, tmp_path):
    cache_dir = tmp_path / "ref_cache"
    extra = {"ref.mode": "cache", "ref.cache_dir": str(cache_dir), "data.eval_files": assets["eval"],
             "train.eval_every": 3, "train.eval_batch_size": 30}
    _, first = run_trainer(assets, tmp_path / "first", nproc=2, **extra)
    assert first["precompute_seconds"] > 0 and not first["reference_loaded"]
    # The precompute's ZeRO-3 reference engine is freed when the precompute ends (DeepSpeed's module
    # stack and memo let go of it: engine.release_engine), not kept through training beside the
    # policy's, nor left to a later garbage collection: one engine before training and after it.
    assert first["engines_alive"] == [1, 1]
    assert [h["loss"] for h in first["history"]] == pytest.approx(CACHE_GOLDEN_LOSSES, abs=2e-5)
    assert [h["kl"] for h in first["history"]] == pytest.approx(CACHE_GOLDEN_KLS, abs=2e-5)
    assert {k: first["eval"][-1][1][k] for k in CACHE_GOLDEN_EVAL} == pytest.approx(CACHE_GOLDEN_EVAL, abs=2e-5)
    _, second = run_trainer(assets, tmp_path / "second", nproc=2, **extra)
    assert second["precompute_seconds"] == 0  # every log-prob came from the cache
    assert [h["loss"] for h in second["history"]] == [h["loss"] for h in first["history"]]
    assert second["eval"] == first["eval"]
    # At step 0 the cached reference equals the policy up to float rounding (the cache was filled
    # with another packing layout, so near-zero rewards break ties either way).
    assert abs(first["eval"][0][1]["rewards/margins"]) < 1e-4
    assert first["eval"][-1][1]["rewards/margins"] > 100 * abs(first["eval"][0][1]["rewards/margins"])

    # The online reference gives the same implicit rewards where the KL cannot differ (step 1: KL = 0).
    _, online = run_trainer(assets, tmp_path / "online", nproc=2, **{"train.max_steps": 1})
    for key in ("loss", "rewards/chosen", "rewards/rejected"):
        assert online["history"][0][key] == pytest.approx(first["history"][0][key], abs=1e-6)

    # Other reference weights: the fingerprint differs and the cache is refused, not used.
    other = tmp_path / "other_model"
    shutil.copytree(assets["model"], other)
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    proc = launch("launch/train_kto.py", ["--deepspeed", "ds_configs/zero3.json",
                                          *base_overrides(assets, tmp_path / "refused"), f"ref.path={other}",
                                          "ref.mode=cache", f"ref.cache_dir={cache_dir}"], nproc=2, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "megakto: error:" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert str(cache_dir) in lines[0] and "fingerprint" in lines[0]


def test_sft_baseline(assets, tmp_path):
    _, result = run_trainer(assets, tmp_path, nproc=2, **{"kto.loss_type": "sft", "train.max_steps": 6})
    losses = [h["loss"] for h in result["history"]]
    assert not result["reference_loaded"]
    assert losses[-1] < losses[0] - 0.1  # mean per-token NLL of the completions falls
    assert all(h["kl"] == 0.0 for h in result["history"])


def test_gradient_checkpointing_and_sft_term(assets, tmp_path):
    """Gradient checkpointing recomputes activations without changing a number; the optional SFT
    term adds weight × mean per-token NLL of the desirable completions to the loss."""
    from tests.e2e.test_train import GOLDEN_LOSSES

    _, ckpt = run_trainer(assets, tmp_path / "ckpt", nproc=2, **{"model.gradient_checkpointing": "true"})
    assert [h["loss"] for h in ckpt["history"]] == pytest.approx(GOLDEN_LOSSES, abs=2e-5)

    _, sft = run_trainer(assets, tmp_path / "sft", nproc=2, **{"kto.sft_weight": 0.5, "train.max_steps": 2})
    first = sft["history"][0]
    # Step 1: the policy is the reference, so the KTO part is exactly 0.5.
    assert first["sft_nll"] > 1.0
    assert first["loss"] == pytest.approx(0.5 + 0.5 * first["sft_nll"], abs=1e-6)
    # The SFT gradient changes the update: step 2's KTO rewards differ from the plain run's.
    assert sft["history"][1]["rewards/chosen"] != pytest.approx(ckpt["history"][1]["rewards/chosen"], abs=1e-6)
