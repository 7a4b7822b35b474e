"""pack(), balance_by_tokens() and segment_logps(): hand-worked layouts and the padded reference."""

import random

import pytest
import torch

from megakto.data.collate import collate
from megakto.data.packing import PackedBatch, balance_by_tokens, first_fit_decreasing, pack
from megakto.kto import sequence_logps
from megakto.kto.segment_logps import segment_logps

PAD = 0


def _rows(lengths, prompt_len=lambda n: (n + 1) // 2):
    """Row i has ids 100*i+1 .. 100*i+n, split into a prompt of prompt_len(n) and the rest."""
    rows = []
    for i, n in enumerate(lengths):
        ids = [100 * i + j + 1 for j in range(n)]
        k = prompt_len(n)
        rows.append((ids[:k], ids[k:]))
    return rows


# -- pack -----------------------------------------------------------------------------------------


def test_ffd_hand_worked():
    """lengths [3, 7, 5, 2, 4, 6, 1], budget 10. Longest first: 7(#1), 6(#5), 5(#2), 4(#4), 3(#0),
    2(#3), 1(#6).
      #1 (7) -> new row A, 3 free      #5 (6) -> A too full, new row B, 4 free
      #2 (5) -> A, B too full, new C   #4 (4) -> B (4 free -> 0)
      #0 (3) -> A (3 free -> 0)        #3 (2) -> C (5 free -> 3)      #6 (1) -> C (3 -> 2)
    Rows A=[1,0] B=[5,4] C=[2,3,6]: 28 tokens in 3 rows of 10, the minimum (ceil 2.8)."""
    assert first_fit_decreasing([3, 7, 5, 2, 4, 6, 1], 10) == [[1, 0], [5, 4], [2, 3, 6]]


def test_pack_exact_layout():
    """The FFD case above as tensors: width 10 (rows A and B are full), row C ends in 2 pads."""
    rows = _rows([3, 7, 5, 2, 4, 6, 1])
    b = pack(rows, max_tokens_per_row=10, pad_id=PAD)
    assert b.num_segments == 7
    assert b.segment_ids.tolist() == [
        [1] * 7 + [0] * 3,
        [5] * 6 + [4] * 4,
        [2] * 5 + [3] * 2 + [6] + [-1] * 2,
    ]
    assert b.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 0, 1, 2],
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
        [0, 1, 2, 3, 4, 0, 1, 0, 0, 1],  # the pad tail restarts too
    ]
    # Row C: #2 = [201..205] prompt 3, #3 = [301, 302] prompt 1, #6 = [601] prompt 1 (no completion).
    assert b.input_ids[2].tolist() == [201, 202, 203, 204, 205, 301, 302, 601, PAD, PAD]
    assert b.completion_mask[2].tolist() == [0, 0, 0, 1, 1, 0, 1, 0, 0, 0]
    assert b.num_tokens == 28
    assert b.input_ids.dtype == b.position_ids.dtype == b.segment_ids.dtype == torch.long


def test_pack_invariants_random():
    """200 random rows of 1..60 tokens, budget 64: every segment exactly once with its own tokens
    in order, no row over budget, positions count 0,1,2,... inside each segment, deterministic."""
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(200)]
    rows = _rows(lengths, prompt_len=lambda n: rng.randint(0, n))
    b = pack(rows, max_tokens_per_row=64, pad_id=PAD)
    assert b.input_ids.shape[1] <= 64
    assert ((b.segment_ids >= 0).sum(1) <= 64).all()
    for i, (p, c) in enumerate(rows):
        where = (b.segment_ids == i).nonzero()
        assert where[:, 0].unique().numel() == 1, f"segment {i} spans rows"
        r, cols = int(where[0, 0]), where[:, 1]
        assert cols.tolist() == list(range(int(cols[0]), int(cols[0]) + len(p) + len(c)))
        assert b.input_ids[r, cols].tolist() == [*p, *c]
        assert b.position_ids[r, cols].tolist() == list(range(len(p) + len(c)))
        assert b.completion_mask[r, cols].tolist() == [0] * len(p) + [1] * len(c)
    assert b.num_tokens == sum(lengths)
    assert (b.completion_mask[b.segment_ids < 0] == 0).all()
    assert (b.input_ids[b.segment_ids < 0] == PAD).all()
    # Lower bound ceil(total/64) rows; FFD stays within 11/9 of the optimum (+1).
    assert len(b.input_ids) <= 11 * -(-sum(lengths) // 64) // 9 + 1
    again = pack(rows, max_tokens_per_row=64, pad_id=PAD)
    for name in ("input_ids", "position_ids", "completion_mask", "segment_ids"):
        assert torch.equal(getattr(b, name), getattr(again, name))


def test_pack_errors_and_options():
    with pytest.raises(ValueError, match=r"sequence 1 has 12 tokens, more than max_tokens_per_row=10"):
        pack(_rows([3, 12]), max_tokens_per_row=10, pad_id=PAD)
    with pytest.raises(ValueError, match="at least one row"):
        pack([], max_tokens_per_row=10, pad_id=PAD)
    with pytest.raises(ValueError, match="empty"):
        pack([([], [])], max_tokens_per_row=10, pad_id=PAD)
    # Longest row 7 -> width rounded up to 8; the 1-token pad tail has position 0.
    b = pack(_rows([4, 3]), max_tokens_per_row=10, pad_id=PAD, pad_to_multiple_of=8)
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    moved = b.to("cpu")
    assert isinstance(moved, PackedBatch) and moved.num_segments == 2


# -- balance_by_tokens ----------------------------------------------------------------------------


def test_balance_hand_worked():
    """lengths [5, 9, 2, 7, 3, 4]. Two bins, longest first to the lighter (ties: lower bin):
    9(#1)->0 [9,0]; 7(#3)->1 [9,7]; 5(#0)->1 [9,12]; 4(#5)->0 [13,12]; 3(#4)->1 [13,15];
    2(#2)->0 [15,15].  Three bins: 9->0, 7->1, 5->2 [9,7,5]; 4->2 [9,7,9]; 3->1 [9,10,9];
    2->0 (tie 9/9, lower bin) [11,10,9]."""
    lengths = [5, 9, 2, 7, 3, 4]
    assert balance_by_tokens(lengths, 2) == [[1, 2, 5], [0, 3, 4]]
    assert balance_by_tokens(lengths, 3) == [[1, 2], [3, 4], [0, 5]]
    assert balance_by_tokens(lengths, 1) == [[0, 1, 2, 3, 4, 5]]
    assert balance_by_tokens([4, 4], 3) == [[0], [1], []]
    with pytest.raises(ValueError, match="num_bins"):
        balance_by_tokens(lengths, 0)


@pytest.mark.parametrize("num_bins", [2, 8, 64])
def test_balance_random(num_bins):
    """1024 lengths in 10..500: a partition, deterministic, and heaviest - lightest <= the largest
    length (LPT: the last item put on the heaviest bin went to the then-lightest bin). With 16+
    items per bin that is tight: max/min load < 1.01 (measured 1.00001, 1.0001, 1.0015)."""
    rng = random.Random(num_bins)
    lengths = [rng.randint(10, 500) for _ in range(1024)]
    groups = balance_by_tokens(lengths, num_bins)
    assert len(groups) == num_bins
    assert sorted(i for g in groups for i in g) == list(range(1024))
    assert all(g == sorted(g) for g in groups)
    loads = [sum(lengths[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= max(lengths)
    assert max(loads) / min(loads) < 1.01
    assert balance_by_tokens(list(lengths), num_bins) == groups


# -- segment_logps --------------------------------------------------------------------------------


def _unpacked_reference(logits, packed, rows):
    """sequence_logps on each segment cut out of the packed logits, in input order."""
    out, counts = [], []
    for i, (p, c) in enumerate(rows):
        r, cols = (packed.segment_ids == i).nonzero().T
        one = collate([(p, c)], pad_id=PAD)
        lp, n = sequence_logps(logits[r[0], cols][None], one.input_ids, one.completion_mask)
        out.append(lp[0])
        counts.append(n[0])
    return torch.stack(out), torch.stack(counts)


def test_segment_logps_hand_made_layout():
    """Hand-made R=2, L=9, V=11: row 0 = seg 2 (prompt 2, completion 3) + seg 0 (prompt 1,
    completion 3); row 1 = seg 1 (prompt 0, completion 4) + 5 pads. Segment 0's first token
    follows a completion token of segment 2; seg 1 has an empty prompt, so its first completion
    token is unscored (as in sequence_logps): n = [3, 3, 3]."""
    gen = torch.Generator().manual_seed(0)
    rows = [([7], [1, 2, 3]), ([], [4, 5, 6, 7]), ([8, 9], [10, 1, 2])]
    packed = PackedBatch(
        input_ids=torch.tensor([[8, 9, 10, 1, 2, 7, 1, 2, 3], [4, 5, 6, 7, 0, 0, 0, 0, 0]]),
        position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3, 4]]),
        completion_mask=torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0, 0]]),
        segment_ids=torch.tensor([[2, 2, 2, 2, 2, 0, 0, 0, 0], [1, 1, 1, 1, -1, -1, -1, -1, -1]]),
        num_segments=3,
    )
    logits = (3 * torch.randn(2, 9, 11, generator=gen)).requires_grad_()
    logps, n = segment_logps(logits, packed.input_ids, packed.completion_mask, packed.segment_ids, 3)
    ref, ref_n = _unpacked_reference(logits, packed, rows)
    assert n.tolist() == ref_n.tolist() == [3, 3, 3]
    torch.testing.assert_close(logps, ref, rtol=0, atol=1e-6)
    assert logps.dtype == torch.float32 and n.dtype == torch.int64
    # Gradients agree as well, and nothing flows into padding or the unscored last position.
    (g,) = torch.autograd.grad(logps.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)
    assert g[1, 3:].abs().sum() == 0 and g[0, 8].abs().sum() == 0


def test_segment_logps_shift_stays_inside_segments():
    """V=2, one row [0, 1 | 0, 1], two segments (prompt 1, completion 1 each). Uniform logits
    everywhere except position 1 (last token of segment 0), whose logits say token 0 is certain.
    If position 1 predicted segment 1's first token the sum would change; it must not: each
    segment scores only its own second token at -ln 2."""
    logits = torch.zeros(1, 4, 2)
    logits[0, 1] = torch.tensor([0.0, -1e4])
    ids = torch.tensor([[0, 1, 0, 1]])
    cmask = torch.tensor([[0, 1, 0, 1]])
    seg = torch.tensor([[0, 0, 1, 1]])
    logps, n = segment_logps(logits, ids, cmask, seg, 2)
    torch.testing.assert_close(logps, torch.full((2,), -0.693147), rtol=0, atol=1e-6)
    assert n.tolist() == [1, 1]
    # If segment 1's first token were a completion token, it would still not be scored.
    logps, n = segment_logps(logits, ids, torch.tensor([[0, 1, 1, 1]]), seg, 2)
    assert n.tolist() == [1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_logps_matches_padded_on_pack(seed):
    """pack() 30 random rows (1..25 tokens, prompts 0..n) into rows of 32; random bf16 logits;
    each segment's log-prob equals sequence_logps on the same logits cut out unpacked."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [rng.randint(1, 25) for _ in range(30)]
    rows = _rows(lengths, prompt_len=lambda n: rng.randint(0, n))
    rows = [([t % 50 for t in p], [t % 50 for t in c]) for p, c in rows]  # ids < V
    packed = pack(rows, max_tokens_per_row=32, pad_id=PAD)
    logits = (4 * torch.randn(*packed.input_ids.shape, 50, generator=gen)).bfloat16()
    logps, n = segment_logps(
        logits, packed.input_ids, packed.completion_mask, packed.segment_ids, packed.num_segments
    )
    ref, ref_n = _unpacked_reference(logits, packed, rows)
    assert n.tolist() == ref_n.tolist()
    assert n.tolist() == [max(0, len(c) - (len(p) == 0)) for p, c in rows]
    # Sums reach ~-300; index_add and sum() add in different orders, so allow fp32 rounding.
    torch.testing.assert_close(logps, ref, rtol=1e-6, atol=1e-5)


def test_segment_logps_shape_errors():
    with pytest.raises(ValueError, match="segment_ids must match"):
        segment_logps(
            torch.zeros(1, 4, 3),
            torch.zeros(1, 4, dtype=torch.long),
            torch.zeros(1, 4),
            torch.zeros(1, 3, dtype=torch.long),
            1,
        )
