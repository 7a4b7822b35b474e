"""Host syncs per micro-batch: on a GPU each one stops the CPU until the device is idle, so the CPU
cannot queue work ahead and ZeRO-3's CPU-side gather hooks stall compute. Counted on CPU with a
``TorchDispatchMode`` over every op the forward and backward dispatch: the ops whose result the
host must read (``aten._local_scalar_dense`` behind ``float()``/``int()``/``bool()``/``.item()``/
``.tolist()``, ``aten.nonzero``, ``aten.masked_select``) and indexing with a boolean mask (a
``nonzero`` inside). The budget is a constant: it must not grow with the number of vocabulary
blocks or token chunks (Qwen2.5-32B's head has 186 blocks)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megakto.data.packing import pack
from megakto.distributed.engine import block_vocab
from megakto.kto.chunked_logps import token_logps
from megakto.metrics import StepSums
from megakto.model.forward import packed_completion_logps
from megakto.model.vocab_blocks import BlockedHead, blocked_token_logps
from tests.model.test_forward import _model, _rows

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.item.default}


def _bool_index(func, args) -> bool:
    if func.overloadpacket not in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        return False
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])


class CountSyncs(TorchDispatchMode):
    """``counts``: host syncs by op name; ``ops``: every op seen (to check backward ran inside)."""

    def __init__(self):
        super().__init__()
        self.counts, self.ops = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        if func in _READS:
            self.counts[func.overloadpacket.__name__] += 1
        elif _bool_index(func, args):
            self.counts[f"{func.overloadpacket.__name__}[bool]"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _head_case(seed=0, n=40, hidden=8, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hidden, generator=g, requires_grad=True), torch.randn(vocab, hidden, generator=g),
            torch.randint(0, vocab, (n,), generator=g))


@pytest.mark.parametrize("chunk", [40, 7, 1])
def test_chunked_log_probs_forward_and_backward_read_nothing_back(chunk):
    """1, 6 and 40 chunks of tokens: no sync at all (was one ``nonzero`` per chunk in backward)."""
    h, w, t = _head_case()
    w.requires_grad_()
    with CountSyncs() as mode:
        token_logps(h, w, t, chunk_size=chunk).sum().backward()
    assert mode.ops["mm"] >= 3 * -(-40 // chunk)  # forward, then grad_h and grad_w per chunk: backward ran here
    assert mode.counts == {}, mode.counts


@pytest.mark.parametrize("rows", [97, 20, 5])
def test_blocked_log_probs_read_nothing_back_whatever_the_blocks(rows):
    """1, 5 and 20 vocabulary blocks, 3 chunks each: still no sync."""
    h, w, t = _head_case()
    head = BlockedHead.from_weight(w, rows)
    with CountSyncs() as mode:
        blocked_token_logps(head, h, t, lambda r: 15).sum().backward()
    assert mode.counts == {}, mode.counts
    assert all(p.grad is not None for p in head.parameters())


def test_a_blocked_models_micro_batch_has_a_constant_budget():
    """The whole chunked path through a tiny Llama (packed rows, blocked embedding and head): the
    same syncs with 2 vocabulary blocks as with 31, whatever the chunk size. What remains is per
    micro-batch: the blocked embedding's id counts (one ``tolist``) and the scored-position mask."""
    data = _rows()
    counts = {}
    for rows, chunk in ((160, 64), (10, 64), (10, 3)):
        model = _model(tie=False)
        block_vocab(model, rows, {})
        batch = pack(data, 40, 0)
        with CountSyncs() as mode:
            logps, _ = packed_completion_logps(model, batch, attn="sdpa", chunk_tokens=chunk)
            logps.sum().backward()
        counts[(rows, chunk)] = dict(mode.counts)
    assert counts[(160, 64)] == counts[(10, 64)] == counts[(10, 3)], counts
    assert sum(counts[(10, 3)].values()) <= 6, counts


def test_step_sums_add_reads_nothing_back():
    """Per micro-batch ``add`` stays on the device (it read 15 values back per call); the step's sums
    reach the host once, through ``values`` (a ``tolist`` of one tensor, which CPU tensors do
    without dispatching an op, so it is not counted here)."""
    sums = StepSums()
    d = torch.tensor([True, False, True])
    with CountSyncs() as mode:
        for _ in range(4):
            sums.add(losses=torch.tensor([0.5, 1.0, 0.25]), rewards=torch.tensor([0.1, -0.2, 0.3]),
                     logps=torch.tensor([-3.0, -4.0, -5.0]), desirable=d, n_tokens=torch.tensor([3, 4, 5]),
                     tokens=15, slopes=torch.tensor([0.2, 0.3, 0.4]))
    assert mode.counts == {}, mode.counts
    values = sums.values
    assert values["loss"] == 7.0 and values["rows"] == 12 and values["count_chosen"] == 8  # 4 × (1.75, 3, 2)
