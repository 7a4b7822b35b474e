"""A 2-stage pipeline (deepspeed.pipe, ZeRO 0) against the same model run whole, for each
supported architecture: packed log-probs through ``eval_batch`` (the block-diagonal mask and the
rotary positions rebuilt on every stage; Mistral's sliding window shorter than the sequences), the
weights after one SGD ``train_batch`` on their sum (every gradient, across the stage boundary),
and the log-probs after the step (a tied output head on the last stage must move with the
embedding on the first)."""

import pytest
import torch

from tests.launcher import launch

pytestmark = [pytest.mark.gloo, pytest.mark.timeout(300)]  # the launcher on a worker script

ARCHS = ["llama", "mistral_sliding", "qwen2", "qwen3", "qwen2_tied"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp_arch")
    proc = launch("tests/model/_pp_arch_worker.py", ["--out", str(out)], nproc=2, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: torch.load(out / f"{name}.pt", weights_only=True) for name in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_pp2_matches_the_whole_model(results, arch):
    r = results[arch]
    torch.testing.assert_close(r["logps"], r["want_logps"], rtol=1e-6, atol=1e-6)
    assert sorted(r["weights"]) == sorted(n for n in r["want_weights"] if not (arch == "qwen2_tied" and n == "lm_head.weight"))
    for name, want in r["want_weights"].items():
        if name in r["weights"]:
            torch.testing.assert_close(r["weights"][name], want, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(r["after"], r["want_after"], rtol=1e-6, atol=1e-5)
    # The step really moved the model, so equal log-probs after it say something.
    assert float((r["after"] - r["logps"]).abs().max()) > 1.0
    # Embedding, 2 decoder layers, norm, head: split by parameter counts over the two stages.
    assert r["parts"][0] == 0 and r["parts"][-1] == 5 and len(r["parts"]) == 3
