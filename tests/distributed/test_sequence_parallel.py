"""Ulysses sequence parallelism against one process, for real: DeepSpeed's engine under ZeRO-3 on 2
ranks (SP2) and 4 (SP2 × DP2) over gloo (tests/distributed/_sequence_parallel_worker.py, one
launch per world size checking every cell), the same model run whole in this process as the answer
(tests/distributed/_sequence_cases.py):

* per-row log-probs within 1e-5 (or one fp32 ulp of sums of 100-250 nats: 1.5e-5);
* one SGD step on a non-linear per-row loss gives the whole model's weights to 1e-7, with ZeRO-3's
  default reduce-scatter and with ``reduce_scatter: false``: the gradient scale of the combined
  sums is right for both of DeepSpeed's averaging rules (megakto.distributed.sequence);
* after it, in eval mode without grad (the reference's path), packed and one sequence per row give
  the whole model's log-probs: the attention stayed sequence-sharded and packing-aware in eval;
* the ranks of a sequence group hold bitwise the same log-probs and weights."""

import pytest
import torch

from tests.distributed._sequence_cases import ARCHS, whole
from tests.launcher import launch

pytestmark = [pytest.mark.gloo, pytest.mark.timeout(600)]


def _run(tmp_path_factory, nproc):
    out = tmp_path_factory.mktemp(f"sp_world{nproc}")
    proc = launch("tests/distributed/_sequence_parallel_worker.py", ["--out", str(out)], nproc=nproc, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in range(nproc)] for name in ARCHS}
    return {name: (ranks, whole(str(out / name), nproc // 2)) for name, ranks in got.items()}


@pytest.fixture(scope="module")
def sp2(tmp_path_factory):
    return _run(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def sp2_dp2(tmp_path_factory):
    return _run(tmp_path_factory, 4)


def _check(result, nproc):
    ranks, (logps, weights, after, update) = result
    dp = nproc // 2
    for r, got in enumerate(ranks):
        rows = slice(r // 2 * 6 // dp, (r // 2 + 1) * 6 // dp)  # sequence group r // 2 holds these rows
        torch.testing.assert_close(got["logps"], logps[rows], rtol=0, atol=1.6e-5)
        assert got["n_tokens"].tolist() == [20, 31, 8, 17, 25, 12][rows]
        for key in ("weights", "weights_nrs"):
            assert sorted(got[key]) == sorted(weights)
            for name, want in weights.items():
                torch.testing.assert_close(got[key][name], want, rtol=0, atol=1e-7, msg=f"{key} {name}")
        torch.testing.assert_close(got["eval_packed"], after[rows], rtol=0, atol=1.6e-5)
        torch.testing.assert_close(got["eval_rows"], after[rows], rtol=0, atol=1.6e-5)
    for a, b in zip(ranks[0::2], ranks[1::2]):  # the two ranks of each sequence group agree bitwise
        assert torch.equal(a["logps"], b["logps"]) and torch.equal(a["eval_packed"], b["eval_packed"])
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in weights)
    # The step moved the weights by far more than the tolerance, and the rows' scores with them: a
    # gradient off by the sequence degree (2x or 1/2) would be off by half the update or more.
    assert update > 1e-3 and float((after - logps).abs().max()) > 1.0


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sp2_equals_one_process(sp2, arch):
    _check(sp2[arch], 2)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sp2_dp2_equals_one_process(sp2_dp2, arch):
    _check(sp2_dp2[arch], 4)
