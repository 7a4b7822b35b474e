"""LoRA under ZeRO-3 on 2 gloo ranks (peft adapters on the attention and MLP projections), the
reference being the policy with its adapters off.

* The reference's log-probs after training are bitwise its log-probs before (the base weights
  never move, and no second model exists); only adapter weights changed; the demo is learned.
* The export: the merged folder equals W + (alpha / r) B A computed by hand from the adapter
  export, and the adapter loads with peft on the base model and gives the merged folder's logits.
* kill -9 → resume → bitwise the uninterrupted run.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megakto.checkpoint import probe_batch
from tests.e2e._parallel_checks import kill_and_resume
from tests.e2e.conftest import run_trainer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

R, ALPHA = 8, 16.0
LORA = {"model.lora.r": R, "model.lora.alpha": ALPHA, "optim.lr": 3e-3, "train.max_steps": 8,
        "checkpoint.every_steps": 4, "checkpoint.keep_last": 3, "train.eval_every": 8,
        "train.eval_batch_size": 30}


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    proc, result = run_trainer(assets, out, nproc=2, **LORA, **{"data.eval_files": assets["eval"],
                                                                "train.export_hf": "true"})
    result["log"] = proc.stdout + proc.stderr
    return out, result


def _base(assets):
    return load_file(os.path.join(assets["model"], "model.safetensors"))


def test_reference_is_the_frozen_base_and_only_adapters_train(assets, lora_run):
    out, result = lora_run
    assert not result["reference_loaded"]  # no second model: run_trainer found no reference engine
    assert "reference: the policy with its LoRA adapters off (no second model)" in result["log"]
    probe = torch.load(os.path.join(out, "dump", "ref_probe.pt"), weights_only=True)
    assert torch.equal(probe["before"], probe["after"])
    weights, base = torch.load(os.path.join(out, "dump", "policy.pt"), weights_only=True), _base(assets)
    lora_b = [k for k in weights if ".lora_B." in k]
    assert len(lora_b) == 2 * 7 and all(float(weights[k].abs().max()) > 0 for k in lora_b)  # B starts at 0
    for name, tensor in weights.items():
        if ".lora_" in name:
            continue
        hf = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(tensor, base[hf]), name  # frozen, bitwise
    evals = result["eval"]
    assert evals[0][1]["reward_accuracy"] == pytest.approx(0.5) and evals[-1][1]["reward_accuracy"] > 0.75
    assert result["history"][0]["kl"] == 0.0 and result["history"][0]["loss"] == pytest.approx(0.5, abs=1e-7)


def test_merged_export_is_w_plus_scaled_ba_and_the_adapter_loads_with_peft(assets, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = lora_run
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (R, ALPHA, "LORA")
    assert config["base_model_name_or_path"] == assets["model"]  # the run's base, which holds the weights
    merged, base = load_file(os.path.join(out, "hf", "model.safetensors")), _base(assets)
    assert sorted(merged) == sorted(base)
    adapted = 0
    for name, w in base.items():
        key = "base_model.model." + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" in adapter:
            a, b = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]
            torch.testing.assert_close(merged[name], w + (ALPHA / R) * b @ a, rtol=0, atol=1e-6, msg=name)
            adapted += 1
        else:
            assert torch.equal(merged[name], w), name
    assert adapted == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    ids = probe_batch(len(base["model.embed_tokens.weight"]))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf")).eval()(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]),
                                                 os.path.join(out, "adapter")).eval()(input_ids=ids).logits
    assert float((plain - with_adapter).abs().max()) <= 1e-5


def test_zero_to_hf_writes_the_adapter_or_the_merged_model(lora_run, tmp_path):
    import subprocess
    import sys

    from tests.launcher import REPO

    out, _ = lora_run
    ckpts = os.path.join(out, "checkpoints")

    def tool(*args):
        return subprocess.run([sys.executable, "tools/zero_to_hf.py", ckpts, *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    proc = tool(str(tmp_path / "adapter"))
    assert proc.returncode == 0, proc.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # the newest checkpoint: the run's end
        a, b = (open(os.path.join(d, name), "rb").read() for d in (tmp_path / "adapter", os.path.join(out, "adapter")))
        assert name.endswith(".json") or a == b, name
    proc = tool(str(tmp_path / "merged"), "--merge-lora", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "(LoRA merged)" in proc.stdout and "(ok," in proc.stdout
    assert load_file(str(tmp_path / "merged" / "model.safetensors")).keys() == \
        load_file(os.path.join(out, "hf", "model.safetensors")).keys()
    proc = tool(str(tmp_path / "x"), "--check")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --check compares a Hugging Face folder's logits: with a LoRA checkpoint, add --merge-lora")


def test_kill9_resume_is_bitwise(assets, lora_run, tmp_path):
    quiet = {"train.eval_every": 0, "train.export_hf": "false"}
    _, resumed = kill_and_resume(assets, tmp_path, ds="ds_configs/zero3.json", settings={**LORA, **quiet},
                                 kill_before_step=6)
    want_out, want = lora_run
    assert resumed["indices"] == want["indices"][4:]
    for got, exp in zip(resumed["history"], want["history"][4:], strict=True):
        for key in ("loss", "kl", "grad_norm", "rewards/margins"):
            assert got[key] == exp[key], key
    got = torch.load(tmp_path / "dumpB" / "policy.pt", weights_only=True)
    exp = torch.load(os.path.join(want_out, "dump", "policy.pt"), weights_only=True)
    assert sorted(got) == sorted(exp) and all(torch.equal(got[k], exp[k]) for k in exp)


def test_lora_with_zero2_checkpointing_cache_and_vocabulary_blocks(assets, tmp_path):
    """The combinations: ZeRO-2, non-reentrant gradient checkpointing, packing, the chunked head on
    vocabulary blocks, and ref.mode=cache, whose precompute runs the policy with its adapters off:
    at step 1 (B = 0) the cached log-probs are the policy's own, so both rewards and the KL are 0."""
    _, result = run_trainer(assets, tmp_path, nproc=2, ds="ds_configs/zero2.json", **{
        "model.lora.r": R, "optim.lr": 3e-3, "model.gradient_checkpointing": "true", "model.vocab_block_rows": 128,
        "ref.mode": "cache", "ref.cache_dir": str(tmp_path / "cache"), "train.max_steps": 3})
    first, last = result["history"][0], result["history"][-1]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["kl"] == 0.0
    assert first["logps/chosen"] < -1.0 and result["precompute_seconds"] > 0 and not result["reference_loaded"]
    assert last["kl"] > 0 and last["loss"] != first["loss"]  # the adapters moved the policy off the reference
