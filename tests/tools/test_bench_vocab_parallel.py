"""tools/bench_vocab_parallel.py: its reference, its memory count and how it combines ranks (unit), and
one tiny run end to end on 1 and 2 ranks (e2e)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.launcher import REPO, load_script, rank_env

bench = load_script("tools/bench_vocab_parallel.py", "megakto_tools_bench_vocab_parallel")
import _vocab_bench as vb  # noqa: E402  (on sys.path once the script is loaded)


def test_case_is_bf16_exact_and_the_chunked_reference_is_the_whole_one(monkeypatch):
    case = vb.make_case(8, 50, 30, seed=1)
    for key in ("hidden", "weight"):
        assert torch.equal(case[key].bfloat16().float(), case[key])
    monkeypatch.setattr(vb, "REF_BLOCK_ELEMENTS", 7 * 50)  # chunks of 7 tokens: 7, 7, 7, 7, 2
    ref = vb.reference(case)
    h, w = case["hidden"].double().requires_grad_(), case["weight"].double().requires_grad_()
    logps = torch.log_softmax(h @ w.T, -1).gather(1, case["targets"][:, None]).squeeze(1)
    (logps * case["upstream"].double()).sum().backward()
    torch.testing.assert_close(ref["logps"], logps.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ref["grad_hidden"], h.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref["grad_weight"], w.grad, rtol=0, atol=1e-12)


def test_peak_allocated_counts_what_lives_at_once():
    """1 MiB, then 2 MiB while the first lives (3 MiB), then both freed and 2.5 MiB: peak 3 MiB."""
    def run():
        a = torch.empty(1 << 18)  # 2^18 fp32 = 1 MiB
        b = torch.empty(1 << 19)
        del a, b
        c = torch.empty(5 << 17)
        del c

    assert vb._peak_allocated(run) == 3 << 20


def test_ranks_combine_to_all_elements_the_slowest_time_and_the_largest_peak():
    def rank(mx, total, count, seconds, peak):
        err = {"max": mx, "sum": total, "count": count}
        return [{"size": "8x40x24", "impl": "megakto", "dtype": "float32", "logps": err, "grad_hidden": err,
                 "grad_weight": err, "seconds": seconds, "peak_bytes": peak}]

    (row,) = bench._combine([rank(1.0, 6.0, 20, 2.0, 3 << 20), rank(3.0, 4.0, 30, 1.5, 5 << 20)])
    assert row["logps"] == {"max": 3.0, "mean": 10.0 / 50}
    assert (row["seconds"], row["peak_mib"]) == (2.0, 5.0)


@pytest.mark.e2e
def test_tiny_run_on_one_and_two_ranks(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "tools/bench_vocab_parallel.py", "--sizes", "8x40x24", "--tp", "1,2",
                           "--json", str(out)], cwd=REPO, env=rank_env({"PYTHONPATH": REPO}), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["tp"], r["dtype"], r["impl"]) for r in rows) == sorted(
        (tp, d, i) for tp in (1, 2) for d in ("float32", "bfloat16") for i in ("megakto", "ds-fused", "ds-logits"))
    for r in rows:
        if r["dtype"] == "float32" or r["impl"] == "megakto":
            assert r["logps"]["max"] < 1e-5, r
        assert r["seconds"] > 0 and r["peak_mib"] > 0
    assert "| float32 | ds-fused |" in proc.stdout
