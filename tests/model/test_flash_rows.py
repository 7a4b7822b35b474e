"""Flash kernels get packed rows as one row, decided by the attention implementation passed down
(megakto.model.packed), never read from the object called; and the guard that refuses several rows
for them. In one process on a tiny Llama with the CPU flash stand-in (tests/model/_flash_emulation.py);
through real ZeRO-3 engines: tests/model/test_flash_packing.py."""

import pytest
import torch

from megakto._demo.tiny_model import make_tiny_model
from megakto.data.collate import collate
from megakto.data.packing import pack
from megakto.errors import ModelError
from megakto.model.forward import completion_logps, packed_completion_logps
from megakto.model.packed import check_rows, for_attention, packed_forward_logps
from tests.model import _flash_emulation as fe

PAD = 3
ROWS = [([10, 11, 12], [13, 14, 15, 16]), ([20, 21], [22, 23, 24, 25, 26]), ([30], [31, 32, 33]),
        ([40, 41, 42, 43], [44, 45])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), seed=1)


def test_guard_refuses_several_rows_for_a_flash_kernel():
    two_rows = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ModelError, match=r"^attn_implementation=flash_attention_2 keeps packed sequences apart "
                                         r"only in a batch of one row, but 2 rows reached the model"):
        check_rows("flash_attention_2", two_rows)
    check_rows("sdpa", two_rows)
    check_rows("flash_attention_2", two_rows[:1])
    batch = pack(ROWS, 12, PAD)  # 3 rows of 11 tokens
    assert batch.input_ids.shape == (3, 11) and for_attention(batch, "flash_attention_3").input_ids.shape == (1, 33)
    assert for_attention(batch, "sdpa") is batch


def test_guard_runs_before_the_model(folder):
    """packed_forward_logps told not to flatten for a flash kernel: refused, the model never called."""
    model = fe.tiny_model(folder, fe.NAME)
    fe.CALLS.clear()
    with pytest.raises(ModelError, match="3 rows reached the model"):
        packed_forward_logps(model, pack(ROWS, 12, PAD), attn=fe.NAME, flatten=False)
    assert fe.CALLS == []


@pytest.mark.parametrize("mode", ["chunked", "full"])
def test_engine_like_wrapper_under_flash(folder, mode):
    """The shape of the bug in one process: a wrapper whose ``config`` is a dict (as a DeepSpeed
    engine's is) around a model on the flash stand-in. With the attention passed down the rows run
    as one and every sequence scores as in its own padded row; the kernel never saw 3 rows."""

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"train_micro_batch_size_per_gpu": 1}

        def forward(self, **kw):
            return self.module(**kw)

    model = fe.tiny_model(folder, fe.NAME)
    with torch.no_grad():
        want, _ = completion_logps(model, collate(ROWS, pad_id=PAD))
        fe.CALLS.clear()
        got, _ = packed_completion_logps(Engine(model), pack(ROWS, 12, PAD), attn=fe.NAME, mode=mode)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert sorted(set(fe.CALLS)) == [(1, "varlen")]
