"""The start-up packing check (megakto.model.packing_check) in one process, on a tiny Llama with
eager, sdpa, the CPU flash stand-in and two leaking kernels (tests/model/_flash_emulation.py); the
same through real ZeRO-3 engines, bfloat16 and AutoTP-2: tests/model/test_flash_packing.py."""

import types

import pytest
import torch

from megakto._demo.tiny_model import make_tiny_model
from megakto.errors import ModelError
from megakto.model.forward import logps_function
from megakto.model.packing_check import check_packing, startup_packing_check, tolerance
from tests.model import _flash_emulation as fe

PAD, VOCAB = 3, 512  # the tiny models' tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), seed=1)


def _check(model, attn, packing=True):
    return check_packing(model, logps_function("chunked", attn=attn), attn=attn, packing=packing, pad_id=PAD,
                         vocab_size=VOCAB, dtype=torch.float32, device="cpu")


def test_tolerance_hand_worked():
    """k·u·(|S| + n) with k = 8: S = -40 nats over n = 8 tokens gives 8·(40 + 8) = 384 units of u.
    bfloat16: u = 2^-8, 384/256 = 1.5 nats; float32: u = 2^-24, 384·2^-24 = 2.2888e-5; float32
    matmuls as TF32 (precision "high"): u = 2^-11, 384/2048 = 0.1875."""
    s, n = torch.tensor([-40.0]), torch.tensor([8])
    assert tolerance(s, n, torch.bfloat16).item() == 1.5
    assert tolerance(s, n, torch.float32).item() == pytest.approx(384 * 2.0**-24, rel=1e-12)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert tolerance(s, n, torch.float32).item() == 0.1875
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("attn", ["eager", "sdpa", fe.NAME])
@pytest.mark.parametrize("packing", [True, False])
def test_check_passes_on_a_right_kernel(folder, attn, packing):
    r = _check(fe.tiny_model(folder, attn), attn, packing)
    assert r.worst < 1 and r.max_diff < 1e-4


@pytest.mark.parametrize("attn, told, fix", [
    (fe.LEAKY, fe.LEAKY, "set data.packing=false"),
    (fe.NAME, "sdpa", "set data.packing=false"),  # a flash kernel megakto does not know of
    (fe.LEAKY_FLASH, fe.LEAKY_FLASH, "set model.attn_implementation=sdpa (or eager)"),
])
def test_check_catches_sequences_that_see_each_other(folder, attn, told, fix):
    model = fe.tiny_model(folder, attn)
    with pytest.raises(ModelError) as err:
        _check(model, told)
    msg = str(err.value)
    assert msg.startswith(f"packing check: packed sequences see each other under model.attn_implementation={told}, "
                          "float32: test sequence ") and "\n" not in msg
    assert f"; {fix}" in msg and msg.endswith("; model.packing_check=false skips this check")
    assert model.training is False  # the model's mode is restored after the check


def test_check_restores_training_mode(folder):
    model = fe.tiny_model(folder, "eager").train()
    _check(model, "eager")
    assert model.training


def _cfg(packing_check):
    return types.SimpleNamespace(model=types.SimpleNamespace(packing_check=packing_check, attn_implementation="eager"),
                                 data=types.SimpleNamespace(packing=True))


def test_startup_check_off_and_under_pipelines_logs_why():
    """No model is touched (None stands for it) when the key is off or the policy is a pipeline."""
    lines = []
    startup_packing_check(None, None, _cfg(False), 1, None, dtype=torch.float32, device="cpu", log=lines.append)
    startup_packing_check(None, None, _cfg(True), 2, None, dtype=torch.float32, device="cpu", log=lines.append)
    assert lines == ["packing check: off (model.packing_check=false)",
                     "packing check: skipped under pipeline parallelism (the policy runs as a pipeline schedule, not "
                     "one forward)"]


def test_startup_check_logs_its_result(folder):
    from megakto.model.load import load_tokenizer

    lines = []
    tokenizer = load_tokenizer(str(folder), key="model.path", trust_remote_code=False)
    startup_packing_check(fe.tiny_model(folder, "eager"), logps_function("chunked", attn="eager"), _cfg(True), 1, tokenizer,
                          dtype=torch.float32, device="cpu", log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("packing check: 4 test sequences score packed as alone (max diff ")
