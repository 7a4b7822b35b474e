"""Checkpoints of an expert-parallel (DeepSpeed AutoEP) engine, under ZeRO-2 and ZeRO-3: 2 ranks,
autoep_size 2, a tiny Qwen3-MoE (tests/checkpoint/_ep_checkpoint_worker.py builds the engine
directly). One launch per stage checks, from the save after step 2:

* the universal form resumed at autoep_size 2 reproduces steps 3 and 4 bitwise (under ZeRO-3 only
  because engine.load_checkpoint gives each optimizer sub-group its own Adam step tensor: AutoEP's
  experts are a second sub-group, which deepspeed 0.19.8's universal load gives the first's);
a second launch resumes the universal form under Hugging Face names in a plain ZeRO engine (no
expert parallelism, parallel.ep_size 1), within 1e-6 of the uninterrupted losses; and in this
process, the export (tools/zero_to_hf.py --check) of the expert-parallel tag is a model that
``from_pretrained`` loads with nothing missing or unexpected, whose logits are the engine's."""

import os
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megakto.checkpoint import probe_batch, read_weights, universal
from megakto.checkpoint.weights import universal_weights
from tests.launcher import launch, load_script

pytestmark = pytest.mark.gloo

WORKER = "tests/checkpoint/_ep_checkpoint_worker.py"
TAG = "step-00000002"


def _run(args):
    proc = launch(WORKER, args, nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_expert_parallel_checkpoint(tmp_path, stage):
    _run(["--out", str(tmp_path), "--stage", str(stage)])
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert not result["universal_shared_steps"]
    assert result["universal"] == result["losses"][2:]  # bitwise

    ckpt = tmp_path / "checkpoints"
    tag = str(ckpt / TAG)
    hf_form = str(tmp_path / "as-hf" / ("universal-" + TAG))
    universal.convert(tag, hf_form, names="hf")
    _run(["--out", str(tmp_path), "--stage", str(stage), "--dense-dir", hf_form])
    dense = torch.load(tmp_path / "dense.pt", weights_only=True)["dense"]
    assert max(abs(a - b) for a, b in zip(dense, result["losses"][2:])) <= 1e-6, (dense, result["losses"])

    # The tag's weights: through a temporary universal form (nothing left beside the tag), the
    # same as the universal form's, under the Hugging Face names.
    shutil.rmtree(ckpt / ("universal-" + TAG))
    weights = read_weights(tag)
    assert sorted(os.listdir(ckpt)) == ["latest", TAG, "zero_to_fp32.py", "zero_to_torch.py"]
    beside = universal_weights(hf_form)
    assert sorted(weights) == sorted(beside) and all(torch.equal(weights[k], beside[k]) for k in weights)
    assert weights["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 32, 32)

    AutoConfig.from_pretrained(tmp_path / "moe").save_pretrained(ckpt / "hf_base")
    zero_to_hf = load_script("tools/zero_to_hf.py", "zero_to_hf_ep")
    out = str(tmp_path / "hf")
    assert zero_to_hf.main([str(ckpt), out, "--check"]) == 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model.eval()(input_ids=probe_batch(model.config.vocab_size)).logits
    assert (logits - result["logits"]).abs().max() <= 1e-5
