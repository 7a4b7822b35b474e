"""The architectures the tensor- and pipeline-parallel workers check, the packed rows they score,
and the whole-model answer they are compared with (one SGD step on the summed log-probs)."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from megakto.data.collate import collate
from megakto.model.forward import completion_logps

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=320, max_position_embeddings=128)
ARCHS = {
    "llama": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**SHAPE, tie_word_embeddings=False, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**SHAPE, tie_word_embeddings=False, head_dim=16),
    "qwen2_tied": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),
}
LR = 0.05  # SGD: the update is the gradient itself (no clipping: optim.grad_clip=1e9)


def rows():
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(3):
        p = torch.randint(1, 320, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(1, 320, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        out.append((p, c))
    return out


def whole(folder):
    """Log-probs of :func:`rows` (padded, full logits), the log-probs after one SGD step on their
    sum, and the weights after it, of the model in ``folder`` run whole in this process."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.train()
    logps, _ = completion_logps(model, collate(rows(), pad_id=0))
    logps.sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
        after, _ = completion_logps(model, collate(rows(), pad_id=0))
    return logps.detach(), after, {k: v.detach().clone() for k, v in model.named_parameters()}
