"""Sequence shards (megakto/data/sp_shards.py), ranks by slicing: every rank's shard is cut here at
once, and the shards must add up to the whole micro-batch (tokens, positions, targets) and give the
same per-sequence log-prob sums as the whole batch scored in one piece."""

import pytest
import torch

from megakto.data.packing import pack, pad_rows
from megakto.data.sp_shards import IGNORE, sequence_shard, sequence_shards, shifted_row
from megakto.kto.segment_logps import segment_logps

# (prompt, completion) pairs; pack(rows, 12) puts 1 (8 tokens, the longest first) in row 0 and 0 and 2
# (7 + 5 tokens) in row 1.
ROWS = [([11, 12, 13], [14, 15, 16, 17]), ([21, 22], [23, 24, 25, 26, 27, 28]), ([31], [32, 33, 34, 35])]


def test_hand_worked_cut():
    """pack(ROWS, 12): row 0 = seq 1 (8 tokens) + 4 pads, row 1 = seq 0 (7) then seq 2 (5); laid end
    to end: 24 tokens, 12 per rank at sp 2. Position t is scored when t+1 is a completion token of
    t's own sequence: seq 1 scores t = 1..6 (targets 23..28), seq 0 t = 2..5 of its shard, seq 2
    t = 7..10."""
    batch = pack(ROWS, 12, pad_id=0)
    first, second = sequence_shards(batch, 2)
    assert first.input_ids.tolist() == [[21, 22, 23, 24, 25, 26, 27, 28, 0, 0, 0, 0]]
    assert first.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]]
    assert first.targets.tolist() == [[-100, 23, 24, 25, 26, 27, 28, -100, -100, -100, -100, -100]]
    assert first.target_segments.tolist() == [[-1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1]]
    assert second.input_ids.tolist() == [[11, 12, 13, 14, 15, 16, 17, 31, 32, 33, 34, 35]]
    assert second.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]]
    assert second.targets.tolist() == [[-100, -100, 14, 15, 16, 17, -100, 32, 33, 34, 35, -100]]
    assert second.target_segments.tolist() == [[-1, -1, 0, 0, 0, 0, -1, 2, 2, 2, 2, -1]]
    assert first.n_tokens.tolist() == second.n_tokens.tolist() == [4, 6, 4]  # whole-batch counts on every rank
    assert first.num_segments == 3 and first.scored.sum() == 6 and second.scored.sum() == 8


def test_labels_are_shifted_before_the_cut():
    """One 9-token sequence at sp 3: each shard's last position predicts the next shard's first token,
    which only the whole row knows."""
    batch = pad_rows([([1, 2], [3, 4, 5, 6, 7, 8, 9])], pad_id=0)
    shards = sequence_shards(batch, 3)
    assert [s.input_ids.tolist()[0] for s in shards] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [s.targets.tolist()[0] for s in shards] == [[IGNORE, 3, 4], [5, 6, 7], [8, 9, IGNORE]]


@pytest.mark.parametrize("sp", [1, 2, 3, 4])
@pytest.mark.parametrize("packed", [True, False])
def test_shards_add_up_to_the_whole(sp, packed):
    torch.manual_seed(sp)
    rows = [([int(t) for t in torch.randint(4, 50, (p,))], [int(t) for t in torch.randint(4, 50, (c,))])
            for p, c in [(3, 9), (5, 2), (1, 13), (4, 4), (2, 7)]]
    batch = pack(rows, 20, pad_id=0) if packed else pad_rows(rows, pad_id=0)
    shards = sequence_shards(batch, sp)
    whole = shifted_row(batch, sp)
    widths = {s.input_ids.shape for s in shards}
    assert widths == {(1, whole[0].shape[1] // sp)} and whole[0].shape[1] % sp == 0
    assert whole[0].shape[1] - batch.input_ids.numel() < sp  # right padding only to the next multiple
    for i, name in enumerate(("input_ids", "position_ids", "targets", "target_segments")):
        assert torch.equal(torch.cat([getattr(s, name) for s in shards], dim=1), whole[i]), name
    for r, s in enumerate(shards):
        assert torch.equal(sequence_shard(batch, sp, r).targets, s.targets)

    # Per-segment log-prob sums from each shard's scored positions, summed over the shards (what the
    # sequence-parallel group's all-reduce does), equal the whole batch's segment_logps.
    logits = torch.randn(*batch.input_ids.shape, 50)
    want, want_n = segment_logps(logits, batch.input_ids, batch.completion_mask, batch.segment_ids, len(rows))
    flat = torch.cat([logits.reshape(-1, 50), torch.zeros(whole[0].shape[1] - batch.input_ids.numel(), 50)])
    width, got = whole[0].shape[1] // sp, torch.zeros(len(rows))
    for r, s in enumerate(shards):
        mask = s.scored[0]
        lp = torch.log_softmax(flat[r * width:(r + 1) * width][mask], -1).gather(1, s.targets[0][mask, None])[:, 0]
        got.index_add_(0, s.target_segments[0][mask], lp)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # fp32, summed in another order
    assert torch.equal(shards[0].n_tokens, want_n)


def test_padding_is_its_own_sequence_and_never_scored():
    batch = pad_rows([([1], [2, 3, 4, 5])], pad_id=0)  # 5 tokens -> 8 at sp 4
    ids, pos, targets, segments = shifted_row(batch, 4, pad_id=7)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 7, 7, 7]]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]  # restarts at 0: no real token attends to it
    assert targets.tolist() == [[2, 3, 4, 5, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert segments.tolist() == [[0, 0, 0, 0, -1, -1, -1, -1]]


def test_bad_arguments():
    batch = pad_rows(ROWS, pad_id=0)
    with pytest.raises(ValueError, match=r"sp_rank must be in \[0, 2\); got 2"):
        sequence_shard(batch, 2, 2)
    with pytest.raises(ValueError, match="sp_size must be >= 1; got 0"):
        sequence_shards(batch, 0)
