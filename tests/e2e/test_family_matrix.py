"""Every model family in every parallel mode (tests/e2e/_family_matrix_worker.py, one 2-rank launch
per mode): each cell either trains with policy *and* reference running, and its numbers agree with
the model run whole in one process, or is refused at start-up, before any weights load, with one
line that names the family, the mode and what to use instead. No cell may crash.

A trained cell asserts: the reference's log-probs of a probe of rows (targets and mismatched pairs)
equal the untrained model folder's, run whole (padded rows, full logits); the policy's equal the
reference's before the first step (the same weights through the other engine) and the step-1 loss
is eq. (7)'s 0.5 at z_ref = 0; after 2 steps the policy moved, the reference did not (bitwise), and
the HF export, loaded with ``from_pretrained``, gives the trained policy's log-probs.
"""

import json
import os
import re

import pytest
import torch

from megakto._demo.data import write_demo_data
from megakto._demo.tiny_model import make_tiny_model
from tests.launcher import REPO, launch

pytestmark = pytest.mark.e2e

ALL = ["llama", "qwen2", "qwen2_tied", "qwen3", "mistral", "gemma2", "phi3", "olmo2", "qwen3_moe"]
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen2_tied": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
           "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
MODES = ["zero3", "zero3_cache", "tp2", "tp2_cache", "pp2", "lora"]

_SOFTCAP_TP = ("Gemma2ForCausalLM (model.path={path}) cannot run with parallel.tp_size=2: it changes the logits after "
               "the output head (final_logit_softcapping=30.0), and parallel.tp_size=2 scores with the chunked "
               "vocabulary-parallel head, which reads the head's own output; run it under ZeRO-3 "
               "(parallel.tp_size=1, parallel.pp_size=1)")
_PLAN_TP = ("model.path={path}: parallel.tp_size=2: {config} ({family})'s tensor-parallel plan splits {layer} as "
            "rowwise_split_input, which DeepSpeed's AutoTP does not implement; use parallel.tp_size=1 (ZeRO-3 "
            "splits it instead)")
_PP_FAMILY = ("model.path: model_type '{family}' with parallel.pp_size=2: pipeline stages are built for llama, "
              "mistral, qwen2, qwen3; use ZeRO-3 or parallel.tp_size for it")
# (mode, family) -> the start-up refusal; every other cell trains.
REFUSED = {
    **{(m, "gemma2"): _SOFTCAP_TP for m in ("tp2", "tp2_cache")},
    **{(m, "phi3"): _PLAN_TP.replace("{config}", "Phi3Config").replace("{layer}", "layers.*.mlp.down_proj")
       for m in ("tp2", "tp2_cache")},
    **{(m, "olmo2"): _PLAN_TP.replace("{config}", "Olmo2Config").replace("{layer}", "layers.*.self_attn.o_proj")
       for m in ("tp2", "tp2_cache")},
    **{("pp2", f): _PP_FAMILY for f in ("gemma2", "phi3", "olmo2", "qwen3_moe")},
}
TOL = 1e-4  # fp32 sums of ~20 token log-probs through packed vs padded rows and split matmuls


@pytest.fixture(scope="module")
def matrix_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_matrix")
    for family in ALL:
        make_tiny_model(root / "models" / family, family=family, seed=0)
    train, _ = write_demo_data(root / "data", n_train_prompts=60, n_eval_prompts=4, seed=0)
    return root, str(train)


@pytest.mark.parametrize("mode", MODES)
def test_every_family(matrix_assets, mode):
    root, train = matrix_assets
    out = root / mode
    out.mkdir()
    proc = launch("tests/e2e/_family_matrix_worker.py", ["--mode", mode, "--families", ",".join(ALL), "--models",
                                                         str(root / "models"), "--data", train, "--out", str(out)],
                  nproc=2, timeout=600)
    crashes = sorted(p.name for p in out.iterdir() if ".crash-rank" in p.name)
    assert not crashes, [(c, (out / c).read_text()[-2000:]) for c in crashes]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for family in ALL:
        result = json.loads((out / f"{family}.json").read_text())
        path = str(root / "models" / family)
        if (mode, family) in REFUSED:
            assert result.get("refused") == REFUSED[mode, family].format(path=path, family=family), (family, result)
            assert "\n" not in result["refused"]
            continue
        assert "refused" not in result, (family, result)
        _check_trained(mode, family, result)


def _check_trained(mode, family, r):
    def t(key):
        return torch.tensor(r[key], dtype=torch.float64)

    where = f"{mode}/{family}"
    assert r["logps_mode"] == ("full" if family == "gemma2" else "chunked"), where
    assert r["reference"] == {"zero3_cache": "CachedReference", "tp2_cache": "CachedReference",
                              "pp2": "PipelineReference", "lora": "AdapterOffReference"}.get(mode, "OnlineReference")
    moe_leaf = family == "qwen3_moe" and mode != "pp2"
    assert r["leaves"] == (["Qwen3MoeSparseMoeBlock"] if moe_leaf else []), where
    assert (t("ref_before") - t("whole_before")).abs().max() < TOL, where
    assert (t("policy_before") - t("ref_before")).abs().max() < TOL, where
    assert torch.equal(t("ref_after"), t("ref_before")), where  # frozen: bitwise
    assert (t("policy_after") - t("policy_before")).abs().max() > 0.05, where  # it trained
    assert (t("export_after") - t("policy_after")).abs().max() < TOL, where
    assert r["export_config"] == [CLASSES[family]], where
    assert r["skipped"] == [None, None], where
    assert abs(r["steps"][0]["loss"] - 0.5) < 1e-6, where  # eq. (7) with rewards 0 and z_ref = 0
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in r["steps"]), where


def _accuracies(log: str) -> dict[int, float]:
    return {int(s): float(a) for s, a in re.findall(r"step (\d+) eval/.*eval/reward_accuracy ([0-9.]+)", log)}


def test_readme_tp2_command_trains_qwen3_as_tp1(tmp_path):
    """The tensor-parallel demo command of docs/parallel.md, on a tiny Qwen3 (q/k norms: the replicated
    parameters AutoTP hooks for gradient all-reduce), reaches TP1's held-out reward accuracy."""
    model = make_tiny_model(tmp_path / "tiny-qwen3", family="qwen3")
    train, eval_ = write_demo_data(tmp_path / "data", n_train_prompts=400, n_eval_prompts=60, seed=0)
    got = {}
    for tp in (1, 2):
        proc = launch("launch/train_kto.py", [
            "--config", os.path.join(REPO, "configs/tiny_demo.yaml"), "--deepspeed", "ds_configs/zero3.json",
            f"model.path={model}", f"parallel.tp_size={tp}", "train.max_steps=20", f"data.train_files={train}",
            f"data.eval_files={eval_}", f"output_dir={tmp_path / f'tp{tp}'}", "train.eval_samples=0"], nproc=2,
            timeout=420, cli=True)  # the deepspeed command, as the docs write it
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        got[tp] = _accuracies(proc.stdout + proc.stderr)
    assert got[1][0] == got[2][0] == 0.5  # the reference itself
    assert got[1][20] >= 0.8, got
    assert abs(got[2][20] - got[1][20]) <= 0.02, got  # float rounding of the split matmuls at most
