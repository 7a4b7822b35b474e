"""AutoTP-2 under ZeRO-3 against the same model run whole, for each supported architecture:
vocabulary-parallel log-probs, the weights after one SGD step on them (so every gradient, the
tensor-parallel layers' and the replicated ones'), and the log-probs after the step (a tied output
head must move with the embedding it is tied to)."""

import pytest
import torch

from tests.launcher import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "qwen2_tied"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_arch")
    proc = launch("tests/model/_tp_arch_worker.py", ["--out", str(out)], nproc=2, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: torch.load(out / f"{name}.pt", weights_only=True) for name in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_the_whole_model(results, arch):
    r = results[arch]
    torch.testing.assert_close(r["logps"], r["want_logps"], rtol=1e-6, atol=0)
    assert sorted(r["weights"]) == sorted(r["want_weights"])
    for name, want in r["want_weights"].items():
        torch.testing.assert_close(r["weights"][name], want, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(r["after"], r["want_after"], rtol=1e-6, atol=0)
    # The step really moved the model, so equal log-probs after it say something.
    assert float((r["after"] - r["logps"]).abs().max()) > 1.0
    assert ("lm_head.weight" in r["weights"]) == (arch != "qwen2_tied")
