"""The start-up packing check: packed rows score as the same sequences alone, on the run's own
policy engine, device, dtype and attention implementation.

Packed training is right only if the attention keeps each packed sequence to itself, which megakto
does not do itself: transformers derives it from the restarting ``position_ids`` (sdpa, eager,
flex: a block-diagonal mask; flash kernels: varlen attention, for a batch of one row only; see
:mod:`megakto.model.packed`). A kernel, a transformers version or a model class that gets this wrong
gives plausible but wrong log-probs and nothing fails, so before the first step four short sequences
are scored in the run's layout and each distinct one alone: three forwards, the largest 2 x 32 tokens.

The probe is a random token sequence A of 16 tokens repeated: packed, the rows are ``[A, A]`` and
``[A, B]`` (B: 12 other tokens); with ``data.packing=false`` four padded rows, which flash kernels
run as one row. A copy of A that sees an earlier copy is predicted by a trained model's induction
heads almost perfectly, so a leak moves its log-prob by a large fraction of itself; the same
sequence alone has nothing to copy from.

Pipeline engines run their own schedule, not one forward; the check is skipped there (their rows'
layout comes from the same :func:`~megakto.model.packed.for_attention`, and the packed-equals-
unpacked tests cover the stages).
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import torch

from megakto.data.packing import pack, pad_rows
from megakto.errors import ModelError
from megakto.model.packed import uses_flash

__all__ = ["PackingCheck", "check_packing", "startup_packing_check", "tolerance", "unit_roundoff"]

_A, _B = (4, 12), (3, 9)  # (prompt, completion) tokens of the probe sequences
_SLACK = 8  # rounding steps the tolerance allows per token: see tolerance()


class PackingCheck(NamedTuple):
    worst: float  # max over sequences of |packed - alone| / tolerance; < 1 passes
    max_diff: float  # nats, summed log-prob of one sequence
    seconds: float


def unit_roundoff(dtype: torch.dtype) -> float:
    """Relative rounding error of one operation in ``dtype`` (half its machine epsilon): 2^-8 for
    bfloat16 (8 significant bits), 2^-24 for float32, unless float32 matmuls run as TF32 or
    bfloat16 (``torch.set_float32_matmul_precision``)."""
    if dtype == torch.float32:
        return {"high": 2.0**-11, "medium": 2.0**-8}.get(torch.get_float32_matmul_precision(), 2.0**-24)
    return torch.finfo(dtype).eps / 2


def tolerance(alone: torch.Tensor, n_tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(S,) largest |packed - alone| that rounding explains, for summed log-probs ``alone`` of
    ``n_tokens`` tokens each, computed in ``dtype``.

    Packed and alone compute the same function on different shapes, so the kernels block and sum
    in other orders and the results differ by rounding only. Each rounding moves a value by at
    most a relative u (:func:`unit_roundoff`). Taking a token's log-prob ``log p_t`` to be off by
    at most a few u relative, plus a few u nats for a near-certain token (|log p_t| ~ 0, whose
    logits still carry their own rounding), and the errors of n tokens adding up in the worst
    case: |diff| <= k·u·Σ_t(|log p_t| + 1) = k·u·(|S| + n), since every log p_t <= 0 makes
    Σ|log p_t| = |S| of the sum S. k = 8 rounding steps covers the layers' own roundings, which
    the residual stream adds rather than compounds.

    In bfloat16 that is (|S| + n) / 32, 3 % of the summed log-prob plus 0.03 nats a token; a
    leaked copy of the probe moves a trained model's log-prob by most of it (induction heads copy a
    repeated random sequence almost perfectly: Olsson et al. 2022). In float32 it is
    ~4.8e-7·(|S| + n): 3e-5 to 1e-4 for the probe's 9 or 12 scored tokens at 5-15 nats each. A
    random-init test model leaks by ~0.1-0.3 nats, caught in float32, not in bfloat16.
    """
    return _SLACK * unit_roundoff(dtype) * (alone.abs() + n_tokens)


def _probe(vocab_size: int) -> tuple[list, list]:
    """The four sequences ``[A, A, A, B]`` and the distinct ones ``[A, B]``: random ids from the
    middle of the vocabulary (clear of the special tokens at either end), the same on every rank."""
    g = torch.Generator().manual_seed(0)
    lo, hi = vocab_size // 4, max(vocab_size // 2, vocab_size // 4 + 2)

    def seq(prompt: int, completion: int):
        ids = torch.randint(lo, hi, (prompt + completion,), generator=g).tolist()
        return ids[:prompt], ids[prompt:]

    a, b = seq(*_A), seq(*_B)
    return [a, a, a, b], [a, b]


def check_packing(model, logps_fn: Callable, *, attn: str, packing: bool, pad_id: int, vocab_size: int,
                  dtype: torch.dtype, device) -> PackingCheck:
    """Score the probe through ``logps_fn(model, batch)`` in the run's layout and each distinct
    sequence alone; raise :class:`ModelError` (one line) if they differ beyond :func:`tolerance`.
    Every rank of the model's groups must call it (the forwards are collective under ZeRO-3 and
    tensor parallelism); all of them compute the same numbers."""
    start = time.perf_counter()
    sequences, distinct = _probe(vocab_size)
    length = sum(map(len, distinct[0]))
    batch = pack(sequences, 2 * length, pad_id) if packing else pad_rows(sequences, pad_id)
    was_training = model.training
    model.eval()  # no dropout
    try:
        with torch.no_grad():
            got, _ = logps_fn(model, batch.to(device))
            alone = [logps_fn(model, pack([s], length, pad_id).to(device)) for s in distinct]
    finally:
        model.train(was_training)
    want = torch.cat([alone[0][0].float()] * 3 + [alone[1][0].float()]).cpu()
    n = torch.cat([alone[0][1]] * 3 + [alone[1][1]]).cpu()
    got = got.detach().float().cpu()
    settings = f"model.attn_implementation={attn}, {str(dtype).removeprefix('torch.')}"
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        raise ModelError(f"packing check: the policy scores short test sequences as {got.tolist()} packed and "
                         f"{want.tolist()} alone ({settings}): not finite; model.packing_check=false skips this check")
    diff = (got - want).abs()
    ratio = diff / tolerance(want, n, dtype)
    i = int(ratio.argmax())
    if ratio[i] >= 1:
        fix = ("set model.attn_implementation=sdpa (or eager)" if uses_flash(attn) else
               "set data.packing=false, or use a transformers that builds packed masks from position_ids (5.x)")
        raise ModelError(
            f"packing check: packed sequences see each other under {settings}: test sequence {i} scores "
            f"{got[i]:.4f} nats packed and {want[i]:.4f} alone (tolerance {float(tolerance(want, n, dtype)[i]):.2g}); "
            f"{fix}; model.packing_check=false skips this check")
    return PackingCheck(float(ratio.max()), float(diff.max()), time.perf_counter() - start)


def startup_packing_check(policy, logps_fn: Callable, cfg, pp: int, tokenizer, *, dtype: torch.dtype, device,
                          log: Callable[[str], None]) -> None:
    """The trainer's call: :func:`check_packing` on the policy engine unless ``model.packing_check``
    is off or the policy is a pipeline (``pp > 1``); one log line either way."""
    if not cfg.model.packing_check:
        log("packing check: off (model.packing_check=false)")
        return
    if pp > 1:
        log("packing check: skipped under pipeline parallelism (the policy runs as a pipeline schedule, not "
            "one forward)")
        return
    r = check_packing(policy, logps_fn, attn=cfg.model.attn_implementation, packing=cfg.data.packing,
                      pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), dtype=dtype, device=device)
    log(f"packing check: 4 test sequences score packed as alone (max diff {r.max_diff:.2g} nats, "
        f"{r.worst:.0%} of the rounding tolerance; {r.seconds:.1f} s)")
