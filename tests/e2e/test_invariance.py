"""The same global batch split as (DP 1, GA 4), (DP 2, GA 2) and (DP 4, GA 1) gives the same loss,
KL and updated weights: the KL reference point is all-reduced as (sum, count) over the whole step
and each micro-batch loss is scaled to the global mean."""

import os

import pytest
import torch

from tests.e2e.conftest import run_trainer

pytestmark = pytest.mark.timeout(900)


def test_dp_ga_invariance(assets, tmp_path):
    runs = {}
    for nproc in (1, 2, 4):
        out = tmp_path / f"dp{nproc}"
        # global batch 16 of micro-batches of 4: grad-accum = 4 / dp
        _, result = run_trainer(assets, out, nproc=nproc, **{"train.max_steps": 3, "train.micro_batch_size": 4})
        runs[nproc] = (result, torch.load(os.path.join(out, "dump", "policy.pt"), weights_only=True))
    base, base_weights = runs[1]
    assert base["world_size"] == 1 and runs[4][0]["world_size"] == 4
    for nproc in (2, 4):
        result, weights = runs[nproc]
        assert result["indices"] == base["indices"]
        for a, b in zip(result["history"], base["history"]):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)
        for name in base_weights:
            torch.testing.assert_close(weights[name], base_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    # The KL is really in play: it is non-zero by step 3, so an unequal split would show.
    assert base["history"][2]["kl"] > 0.01
