"""The architectures, rows and loss the sequence-parallel worker checks, and the whole-model answer
they are compared with: the same model in one process (sdpa, full logits), one SGD step on the
mean over the data-parallel ranks of each rank's loss (what DeepSpeed's averaging must give)."""

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from megakto.data.packing import pad_rows
from megakto.model.forward import packed_completion_logps

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=320, max_position_embeddings=128)
ARCHS = {
    "llama": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**SHAPE, tie_word_embeddings=False, head_dim=16),
}
LR = 0.05  # SGD: the update is the gradient itself (no clipping: optim.grad_clip=1e9)
# One weight per row, of both signs: the loss is not linear in the log-probs, so a wrong gradient
# scale of the combined sums cannot hide.
WEIGHTS = (1.0, -0.5, 2.0, 0.7, -1.2, 1.5)


def rows():
    """Six (prompt, completion) rows of 11 to 40 tokens; packed 64 tokens to a row they fill 2-3 rows."""
    g = torch.Generator().manual_seed(11)
    out = []
    for p, c in [(4, 20), (7, 31), (3, 8), (9, 17), (2, 25), (5, 12)]:
        out.append((torch.randint(4, 320, (p,), generator=g).tolist(), torch.randint(4, 320, (c,), generator=g).tolist()))
    return out


def loss_of(logps: torch.Tensor, first: int) -> torch.Tensor:
    """sum_i w_(first+i) * softplus(-0.05 * logps_i): rows ``first``.. of :func:`rows`."""
    w = torch.tensor(WEIGHTS[first:first + len(logps)], dtype=logps.dtype)
    return (w * F.softplus(-0.05 * logps)).sum()


def whole(folder, dp: int):
    """Of the model in ``folder`` run whole: the 6 rows' log-probs, the weights after one SGD step on
    the mean over ``dp`` ranks of :func:`loss_of` (rank r holding rows r·6/dp..), the log-probs
    after it in eval mode, and the largest change of a weight in that step."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    logps, _ = packed_completion_logps(model, pad_rows(rows(), 0), attn="sdpa")
    per = 6 // dp
    loss = sum(loss_of(logps[r * per:(r + 1) * per], r * per) for r in range(dp)) / dp
    loss.backward()
    update = max(float(LR * p.grad.abs().max()) for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
        model.eval()
        after, _ = packed_completion_logps(model, pad_rows(rows(), 0), attn="sdpa")
    return logps.detach(), {k: v.detach().clone() for k, v in model.named_parameters()}, after, update
