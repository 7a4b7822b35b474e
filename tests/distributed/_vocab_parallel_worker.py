"""One rank of the vocabulary-parallel test: holds rows [start, end) of the output matrix, computes
the completion tokens' log-probs and grads over the gloo group, and saves them for the parent to
compare."""

import os

import torch
import torch.distributed as dist

from megakto.distributed.vocab_parallel import group_reducers, vocab_shard_range
from megakto.kto.chunked_logps import token_logps


def make_case(vocab_size: int):
    """The same inputs on every rank (and in the parent): fp64, B=3, T=12, H=6."""
    g = torch.Generator().manual_seed(1234)
    hidden = torch.randn(3, 12, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab_size, 6, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, vocab_size, (3, 12), generator=g)
    mask = torch.zeros(3, 12, dtype=torch.long)
    mask[0, 3:] = 1
    mask[1, 5:9] = 1
    mask[2, 1:] = 1
    upstream = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)
    return hidden, weight, input_ids, mask, upstream


def scored_tokens(hidden, input_ids, mask):
    """Positions t whose successor t+1 is a completion token (what packed_completion_logps scores):
    their hidden states (N, H), target ids (N,) and sequence index (N,)."""
    rows, cols = torch.nonzero(mask[:, 1:].bool(), as_tuple=True)
    return hidden[rows, cols], input_ids[rows, cols + 1], rows


def run(rank: int, world_size: int, init_file: str, out_dir: str, vocab_size: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        group = dist.new_group(list(range(world_size)))
        start, end = vocab_shard_range(vocab_size, group)
        hidden, weight, input_ids, mask, upstream = make_case(vocab_size)
        hidden, targets, seq = scored_tokens(hidden, input_ids, mask)
        hidden.requires_grad_()
        shard = weight[start:end].clone().requires_grad_()
        reduce_max, reduce_sum = group_reducers(group)
        logps = token_logps(hidden, shard, targets, chunk_size=5, vocab_start=start, reduce_max=reduce_max,
                            reduce_sum=reduce_sum)
        (logps * upstream[seq]).sum().backward()
        torch.save({"start": start, "end": end, "logps": logps.detach(), "grad_hidden": hidden.grad,
                    "grad_weight": shard.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
