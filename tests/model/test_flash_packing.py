"""Packing under a flash-attention kernel through real ZeRO-3 engines (2 CPU ranks over gloo; one
launch, tests/model/_flash_packing_worker.py).

transformers isolates packed sequences for flash kernels only in a batch of one row, so megakto runs
packed rows as one row for them, knowing the kernel from the run's resolved attention (a DeepSpeed
engine's ``config`` is its own dict, so reading the kernel from the engine said "not flash"). The
kernel here is a CPU stand-in that follows transformers' flash dispatch rules
(tests/model/_flash_emulation.py)."""

import pytest
import torch

from megakto._demo.tiny_model import make_tiny_model
from tests.launcher import launch

pytestmark = [pytest.mark.gloo, pytest.mark.timeout(300)]

FAMILIES = ("llama", "qwen3")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    models = tmp_path_factory.mktemp("flash_models")
    for family in FAMILIES:
        make_tiny_model(models / family, family=family, seed=1)
    out = tmp_path_factory.mktemp("flash_out")
    proc = launch("tests/model/_flash_packing_worker.py", ["--out", str(out), "--models", str(models)], nproc=2,
                  timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "results.pt", weights_only=True)


@pytest.mark.parametrize("mode", ["chunked", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_unpacked_under_flash(results, family, mode):
    """Six sequences in three rows (2, 3 and 1 of them): every sequence's log-prob equals its own
    padded row's to 1e-5, and the kernel saw one row (varlen from the position restarts). Before
    the attention was passed down the kernel saw 3 rows (dense) and 3 of the 6 sequences were off
    by up to 0.09 (Llama) and 0.16 (Qwen3) nats."""
    r = results["logps"][family, mode]
    assert r["packed_rows"] == 3 and r["segments_per_row"] == [2, 3, 1]  # leaks unless run as one row
    torch.testing.assert_close(r["got"], r["want"], rtol=0, atol=1e-5)
    assert r["calls"] == [(1, "varlen")]
