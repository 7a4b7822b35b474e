"""token_logps: hand-worked gradient, gradcheck, equality with sequence_logps over full logits,
vocabulary shards combined through a threaded fake group, and the memory bound (no N x V tensor)."""

import math
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megakto.kto import sequence_logps
from megakto.kto.chunked_logps import token_logps


def _case(dtype, h=8, v=37, seed=0):
    """A (B, T) batch as sequence_logps sees it, and the scored tokens token_logps sees: positions t
    whose successor t+1 is a completion token (what packed_completion_logps selects). Returns the
    full hidden states and weight, the batch, and the scored hidden rows (a leaf), their targets
    and their sequence index."""
    b, t = 3, 11
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    input_ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    mask[0, 4:] = 1  # prompt of 4, completion to the end
    mask[1, 2:7] = 1  # completion then right padding
    mask[2, 9:] = 1
    input_ids[1, 7:] = -100  # padding ids that are not valid indices must never be gathered
    rows, cols = torch.nonzero(mask[:, 1:].bool(), as_tuple=True)
    scored = hidden[rows, cols].clone().requires_grad_()
    return hidden, weight, input_ids, mask, scored, input_ids[rows, cols + 1], rows


def _per_sequence(tok: torch.Tensor, rows: torch.Tensor, b: int = 3) -> torch.Tensor:
    return torch.zeros(b, dtype=tok.dtype).index_add(0, rows, tok)


def test_hand_worked_token():
    """V=2, H=1: hidden [[1]], weight [[ln 3], [0]] -> logits [ln 3, 0], softmax [3/4, 1/4].

    target 0: log p = ln 3/4 = -0.287682;  dlogp/dz = onehot - softmax = [1/4, -1/4]
      d/dhidden = sum_j (dz_j) W_j = 1/4 * ln 3 = 0.274653
      d/dweight = (dz)^T hidden     = [[1/4], [-1/4]]
    """
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[math.log(3)], [0.0]], requires_grad=True)
    out = token_logps(hidden, weight, torch.tensor([0]))
    torch.testing.assert_close(out, torch.tensor([math.log(0.75)]))
    out.sum().backward()
    torch.testing.assert_close(hidden.grad, torch.tensor([[0.25 * math.log(3)]]))
    torch.testing.assert_close(weight.grad, torch.tensor([[0.25], [-0.25]]))


def test_gradcheck_fp64():
    """The hand-written backward against finite differences, with chunks that do not divide N."""
    _, weight, _, _, h, targets, rows = _case(torch.float64, h=4, v=9)
    upstream = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)[rows]
    fn = lambda h, w: (token_logps(h, w, targets, chunk_size=3) * upstream).sum()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, weight))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_matches_full_logits(dtype, tol, chunk_size):
    """Per-sequence sums of the scored tokens' log-probs, and their grads, equal the reference over
    full logits (fp64: an fp64 log-softmax, since sequence_logps computes in fp32)."""
    hidden, weight, input_ids, mask, h, targets, rows = _case(dtype)
    hidden = hidden.requires_grad_()
    upstream = torch.tensor([1.0, -0.5, 2.0], dtype=dtype)
    tok = token_logps(h, weight, targets, chunk_size=chunk_size)
    assert tok.shape == targets.shape and tok.dtype == dtype
    logps = _per_sequence(tok, rows)
    gh, gw = torch.autograd.grad((logps * upstream).sum(), (h, weight))
    if dtype == torch.float64:
        logits = hidden @ weight.T
        labels = input_ids[:, 1:].masked_fill(~mask[:, 1:].bool(), 0)
        ref_tok = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ref = torch.where(mask[:, 1:].bool(), ref_tok, 0.0).sum(-1)
        ref_n = mask[:, 1:].sum(-1)
    else:
        ref, ref_n = sequence_logps(hidden @ weight.T, input_ids, mask)
    rh, rw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    assert torch.bincount(rows, minlength=3).tolist() == ref_n.tolist() == [7, 5, 2]
    torch.testing.assert_close(logps, ref, rtol=tol, atol=tol)
    scored = mask[:, 1:].bool()
    torch.testing.assert_close(gh, rh[:, :-1][scored], rtol=tol, atol=tol)
    assert torch.all(rh[:, :-1][~scored] == 0) and torch.all(rh[:, -1] == 0)  # nothing else is scored
    torch.testing.assert_close(gw, rw, rtol=tol, atol=tol)


def test_bf16_logits_are_fp32():
    """bf16 hidden and weight: the matmul takes the bf16 numbers but its products, sums and logits
    are fp32 (audit F10), so the log-probs equal sequence_logps over the fp32 logits of the same bf16
    numbers to fp32 rounding. The path that rounds the logits to bf16 first (nn.Linear, then
    .float()) is off by up to half a logit ulp a token: here 1.3e-2 nats, against < 1e-5."""
    hidden, weight, input_ids, mask, h, targets, rows = _case(torch.bfloat16)
    hidden = hidden.requires_grad_()
    tok = token_logps(h, weight, targets, chunk_size=4)
    assert tok.dtype == torch.float32
    logps = _per_sequence(tok, rows)
    ref, _ = sequence_logps(hidden.float() @ weight.float().T, input_ids, mask)
    rounded, _ = sequence_logps(hidden @ weight.T, input_ids, mask)
    torch.testing.assert_close(logps, ref, rtol=1e-6, atol=1e-5)
    assert float((rounded - ref).detach().abs().max()) > 1e-3 > 100 * float((logps - ref).detach().abs().max())
    gh, gw = torch.autograd.grad(logps.sum(), (h, weight))
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    assert gh.dtype == gw.dtype == torch.bfloat16
    # The reference's gradients are fp32 (autograd through .float()) rounded to bf16 once, as ours.
    torch.testing.assert_close(gh.float(), rh[:, :-1][mask[:, 1:].bool()].float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_bf16_weight_gradient_is_rounded_once(chunk_size):
    """The weight gradient of a bf16 head, summed over 64 tokens one chunk at a time, is the float64
    truth (of the same bf16 numbers) rounded to bf16 once: within u = 2^-8 of each element, whatever
    the chunk size (audit F9/§3-K); the hidden gradient too, and the log-probs are the truth to fp32
    rounding. The bf16 path before (softmax gradient rounded to bf16 for the matmuls, the running
    sum rounded after every chunk, logits rounded to bf16) was off by up to 850 u on weight-gradient
    elements whose terms cancel, 430 u on the hidden gradient, and 0.066 nats on a log-prob."""
    g = torch.Generator().manual_seed(1)
    n, h, v = 64, 16, 37
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = (torch.randn(v, h, generator=g) * 2).bfloat16()  # logits of several units, as a model's
    targets = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g, dtype=torch.float64)

    def run(hid, w, chunk):
        hid, w = hid.detach().requires_grad_(), w.detach().requires_grad_()
        tok = token_logps(hid, w, targets, chunk_size=chunk)
        return (tok.double(), *torch.autograd.grad((tok * up.to(tok.dtype)).sum(), (hid, w)))

    truth_tok, truth_h, truth_w = run(hidden.double(), weight.double(), n)
    tok, gh, gw = run(hidden, weight, chunk_size)
    u = 2.0 ** -8
    assert float(((tok - truth_tok).abs() / (truth_tok.abs() + 1)).max()) < 1e-5
    for got, truth in ((gh, truth_h), (gw, truth_w)):
        err = (got.double() - truth).abs() / (truth.abs() * u + 1e-6)
        assert float(err.max()) <= 1.0 + 1e-3, (chunk_size, float(err.max()))


class _ThreadGroup:
    """A fake process group of threads: all_reduce(max/sum) over the tensors the threads pass in.
    Counts the collectives each member makes, so the test can see the group is actually used."""

    def __init__(self, size):
        self.size, self.slots, self.calls = size, [None] * size, [0] * size
        self.barrier = threading.Barrier(size)

    def reducers(self, rank):
        def make(op):
            def reduce(t):
                self.calls[rank] += 1
                self.slots[rank] = t.clone()
                self.barrier.wait()
                total = self.slots[0].clone()
                for other in self.slots[1:]:
                    total = torch.maximum(total, other) if op == "max" else total + other
                self.barrier.wait()
                t.copy_(total)  # in place, returning None: the other accepted convention
            return reduce
        return make("max"), make("sum")


@pytest.mark.parametrize("bounds", [[0, 37], [0, 20, 37], [0, 5, 6, 30, 37]])
def test_vocab_shards_through_fake_group(bounds):
    """Ranks by slicing: uneven vocabulary shards, each in a thread, reproduce the full-vocab
    values; each shard's weight grad is its slice of the full grad; every shard's hidden grad is the
    full hidden grad."""
    _, weight, _, _, hidden, targets, _ = _case(torch.float64)
    ref = token_logps(hidden, weight, targets, chunk_size=4)
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    size = len(bounds) - 1
    group, results = _ThreadGroup(size), [None] * size

    def run(r):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach()[bounds[r]:bounds[r + 1]].clone().requires_grad_()
        reduce_max, reduce_sum = group.reducers(r) if size > 1 else (None, None)
        out = token_logps(h, w, targets, chunk_size=4, vocab_start=bounds[r], reduce_max=reduce_max,
                          reduce_sum=reduce_sum)
        results[r] = (out.detach(), *torch.autograd.grad(out.sum(), (h, w)))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    for r, (out, gh, gw) in enumerate(results):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gh, rh, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gw, rw[bounds[r]:bounds[r + 1]], rtol=1e-12, atol=1e-12)
    # forward: one max + one sum; backward: one sum of the hidden grad.
    assert group.calls == ([3] * size if size > 1 else [0])


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_bound_no_tokens_by_vocab_tensor():
    """N=192 scored tokens, V=500, chunk 16: nothing saved for backward grows with V except the
    weight itself, and no op in forward or backward produces more than one (chunk x V) block."""
    n, v, h, chunk = 192, 500, 8, 16
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = token_logps(hidden, weight, targets, chunk_size=chunk)
    assert sorted(saved, key=lambda s: s.numel()) == [(n,), (n,), (n, h), (v, h)]  # targets, lse
    mode = _LargestTensor()
    with mode:
        out = token_logps(hidden, weight, targets, chunk_size=chunk)
        out.sum().backward()
    assert mode.largest == chunk * v < n * v


def test_shape_errors():
    with pytest.raises(ValueError, match="hidden must be"):
        token_logps(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden must be"):
        token_logps(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        token_logps(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), chunk_size=0)
