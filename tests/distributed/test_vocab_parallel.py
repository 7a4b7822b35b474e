"""Vocabulary-parallel token log-probs on real gloo groups of 2 and 4 processes, compared with the
single-process full-vocabulary result (values, hidden grad, and each rank's weight-shard grad)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megakto.distributed.vocab_parallel import group_reducers, vocab_shard_range
from megakto.kto import sequence_logps
from tests.distributed._vocab_parallel_worker import make_case, run, scored_tokens


@pytest.mark.gloo
@pytest.mark.parametrize("world_size,vocab_size", [(2, 40), (4, 37)])
def test_sharded_equals_full_vocab(tmp_path, world_size, vocab_size):
    """V=37 over 4 ranks gives uneven shards 10/9/9/9; V=40 over 2 divides evenly."""
    mp.spawn(run, args=(world_size, str(tmp_path / "init"), str(tmp_path), vocab_size), nprocs=world_size)
    hidden, weight, input_ids, mask, upstream = make_case(vocab_size)
    weight.requires_grad_()
    # Ground truth: full logits, fp64 log-softmax (sequence_logps itself computes in fp32).
    ref, ref_n = sequence_logps(hidden @ weight.T, input_ids, mask)
    scored, targets, seq = scored_tokens(hidden, input_ids, mask)
    scored.requires_grad_()
    exact = torch.log_softmax(scored @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    per_sequence = torch.zeros(3, dtype=exact.dtype).index_add(0, seq, exact)
    torch.testing.assert_close(per_sequence.float(), ref)  # the fp64 version is the same quantity
    assert torch.bincount(seq, minlength=3).tolist() == ref_n.tolist() == [9, 4, 11]
    (exact * upstream[seq]).sum().backward()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    bounds = [(r["start"], r["end"]) for r in results]
    base, extra = divmod(vocab_size, world_size)
    sizes = [base + (r < extra) for r in range(world_size)]
    assert [e - s for s, e in bounds] == sizes and bounds[0][0] == 0 and bounds[-1][1] == vocab_size
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world_size - 1))
    for r in results:
        torch.testing.assert_close(r["logps"], exact.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["grad_hidden"], scored.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["grad_weight"], weight.grad[r["start"]:r["end"]], rtol=1e-12, atol=1e-12)


def test_no_group_or_group_of_one_means_no_reduction(tmp_path):
    assert group_reducers(None) == (None, None)
    assert vocab_shard_range(37, None) == (0, 37)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert group_reducers(dist.group.WORLD) == (None, None)
        assert vocab_shard_range(37, dist.group.WORLD) == (0, 37)
    finally:
        dist.destroy_process_group()
