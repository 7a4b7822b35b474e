"""tools/gpu_check.sh, the first-GPU check: ``--cpu`` runs every step tiny on this machine and its
summary holds positive figures; the summary step's lines from a made-up benchmark report (a GPU
system, a failed one). The figures are measured, never compared with a speed."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.launcher import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
gpu_check = load_script("tools/_gpu_check.py", "megakto_tools_gpu_check")

NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"


@pytest.mark.e2e
def test_cpu_mode_prints_positive_figures(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("MEGAKTO_WHEELS", None)
    res = subprocess.run(["bash", "tools/gpu_check.sh", "--cpu"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    summary = (tmp_path / "gpu_check.txt").read_text()
    assert res.returncode == 0, summary + res.stderr[-3000:]
    lines = summary.splitlines()
    assert lines[-1].startswith("gpu_check: passed in ")
    assert re.search(r"^versions: python .*, torch .*, CUDA .*, NCCL .*, deepspeed ", summary, re.M)
    assert re.search(r"^device: cpu", summary, re.M)
    # packing: sdpa in float32 and bfloat16, packed and padded rows, and the trainer's own start-up check
    packing = [ln for ln in lines if ln.startswith("packing check ")]
    assert len(packing) == 5 and all(": passed (" in ln or ": 4 test sequences score packed as alone" in ln
                                     for ln in packing), packing
    for system in ("megakto-kto", "megakto-kto-cached", "megakto-sft"):
        m = re.search(rf"^{system}: {NUMBER} target tokens/s, peak RSS {NUMBER} MiB", summary, re.M)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, system
    m = re.search(rf"^ratio: megakto KTO / megakto SFT, tokens/s = {NUMBER}$", summary, re.M)
    assert m and float(m.group(1)) > 0
    trl = [ln for ln in lines if ln.startswith("trl-kto: ")]
    assert len(trl) == 1 and (trl[0].startswith("trl-kto: not run (trl is not installed")
                              or re.match(rf"trl-kto: {NUMBER} target tokens/s", trl[0]))
    assert json.loads((tmp_path / "gpu_check_bench.json").read_text())["settings"]["device"] == "cpu"
    # memory: the short ZeRO-3 run's peak beside its dry-run plan (on a GPU also what is live at the peak)
    m = re.search(rf"^memory: ZeRO-3, reference offloaded, world 1, .*: dry-run plan {NUMBER} GiB per rank, "
                  rf"measured {NUMBER} GiB resident set", summary, re.M)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, summary
    assert not list(tmp_path.glob("megakto-gpu-check.*"))  # the models are removed


def _result(tokens_per_s, gpu=None):
    r = {"ok": True, "tokens_per_s": tokens_per_s, "peak_rss_mib": 900.0, "setup_s": 12.0, "precompute_s": None}
    if gpu is not None:
        r.update(peak_gpu_mib=gpu, peak_gpu_reserved_mib=gpu + 100)
    return r


def test_summary_lines(tmp_path, capsys):
    report = {
        "machine": {"device": "cuda: NVIDIA H100"},
        "workload": {"n_params": 596e6, "vocab_size": 151936,
                     "model_shape": {"family": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28,
                                     "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 3072}},
        "settings": {"dtype": "bfloat16", "batch": 32, "micro_batch": 8, "warmup": 2, "steps": 18,
                     "megakto_overrides": ["ref.offload=cpu"]},
        "results": {"megakto-kto": _result(5000.0, gpu=6000.0), "megakto-sft": _result(8000.0, gpu=5000.0),
                    "trl-kto": {"ok": False, "error": "exit 1: CUDA out of memory", "log": "/w/trl-kto.log"}},
        "ratios": {"megakto KTO / megakto SFT, tokens/s": 0.625, "megakto KTO / TRL KTO (online), tokens/s": None},
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    (tmp_path / "megakto-kto.log").write_text("[megakto 09:01:26] packing check: 4 test sequences score packed "
                                              "as alone (max diff 0.01 nats)\n")
    out = tmp_path / "summary.txt"
    assert gpu_check.main(["--summary", str(out), "summary", str(path), "--workdir", str(tmp_path)]) == 1
    lines = out.read_text().splitlines()
    assert capsys.readouterr().out.splitlines() == lines
    assert lines[0].startswith("model: qwen3, 596.0M parameters (hidden 1024, 28 layers, 16 heads / 8 KV heads, ")
    assert "ZeRO-3 world 1 on cuda: NVIDIA H100, dtype bfloat16, global batch 32 (micro 8)" in lines[0]
    assert lines[1:] == [
        "megakto-kto: 5000.0 target tokens/s, peak GPU 6000 MiB (reserved 6100 MiB), peak RSS 900 MiB, setup 12.0 s",
        "megakto-sft: 8000.0 target tokens/s, peak GPU 5000 MiB (reserved 5100 MiB), peak RSS 900 MiB, setup 12.0 s",
        "trl-kto: FAILED: exit 1: CUDA out of memory (log: /w/trl-kto.log)",
        "ratio: megakto KTO / megakto SFT, tokens/s = 0.625",
        "packing check trainer start-up (megakto-kto, its engine, dtype and attention): 4 test sequences score "
        "packed as alone (max diff 0.01 nats)",
    ]


def test_summary_without_a_report_says_so(tmp_path, capsys):
    assert gpu_check.main(["summary", str(tmp_path / "none.json")]) == 1
    assert capsys.readouterr().out.startswith("benchmark: no report at ")


def test_settings_per_device():
    assert gpu_check._settings("cpu") == [("sdpa", "float32"), ("sdpa", "bfloat16")]
    with_flash = [("sdpa", "float32"), ("sdpa", "bfloat16"), ("flash_attention_2", "bfloat16")]
    assert gpu_check._settings("cuda") == (with_flash if gpu_check._version("flash_attn") else with_flash[:2])
