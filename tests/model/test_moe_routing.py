"""A mixture-of-experts model under ZeRO-3 on 2 ranks whose micro-batches route to disjoint
experts (tests/model/_moe_routing_worker.py): the step completes (ZeRO-3 prefetches by the order
modules ran, which routing changes; the MoE block is a leaf module, gathered whole on entry), and
log-probs and weights after one SGD step match the model run whole in one process."""

import pytest
import torch
from safetensors.torch import load_file

from tests.launcher import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_disjoint_routing_under_zero3_matches_the_whole_model(tmp_path):
    proc = launch("tests/model/_moe_routing_worker.py", ["--out", str(tmp_path)], nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = torch.load(tmp_path / "moe.pt", weights_only=True)
    assert r["experts"] == [[0, 1], [2, 3]]  # the ranks never route to the same expert
    assert r["leaves"] == ["Qwen3MoeSparseMoeBlock"]
    for got, want in zip(r["logps"], r["want_logps"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert sorted(r["weights"]) == sorted(r["want_weights"])
    for name, want in r["want_weights"].items():
        torch.testing.assert_close(r["weights"][name], want, rtol=0, atol=1e-6, msg=name)
    # Each expert was trained by one rank only, and every one of them moved: both ranks' expert
    # gradients reached the update.
    before = load_file(str(tmp_path / "moe" / "model.safetensors"))
    for layer in range(2):
        fused = r["weights"][f"model.layers.{layer}.mlp.experts.down_proj"]  # (expert, hidden, width)
        for e in range(4):  # saved per expert, as transformers writes fused experts
            change = (fused[e] - before[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"]).abs().max()
            assert float(change) > 1e-5, (layer, e, float(change))  # an expert no rank used: exactly 0
