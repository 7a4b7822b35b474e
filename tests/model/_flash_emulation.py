"""A CPU stand-in for a flash-attention kernel, following transformers' flash dispatch rules.

transformers (5.x, ``modeling_flash_attention_utils._flash_attention_forward``) gives flash kernels
no 4D mask and picks one of four paths per call:

1. a 2D padding mask (``flash_attention_mask`` keeps it only when some key is padding): unpad, then
   varlen attention per row;
2. ``cu_seq_lens_q/k`` and ``max_length_q/k`` given: varlen over those sequences;
3. ``_is_packed_sequence(position_ids, batch_size)``, which is true only for a batch of **one** row
   whose positions restart: varlen over the sequences the restarts delimit;
4. otherwise dense causal attention over the whole row.

So several packed sequences in each of several rows attend to the earlier sequences of their row
(path 4), which is the trap :func:`megakto.model.forward.for_attention` avoids by running the rows
as one. This module registers an attention function that takes the same paths, deciding path 3
with transformers' own ``_is_packed_sequence``, and computes each path exactly in fp32 (a boolean
mask, then softmax), with the sliding window and logit soft-capping of the real kernels. Its name
contains "flash", so megakto treats it as a flash kernel.

transformers tries to import a kernel for any name containing "flash" when a model is loaded with
it, so a model is loaded with another implementation and switched with :func:`use_flash_emulation`.
Every call records ``(batch_rows, path)`` in :data:`CALLS`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

__all__ = ["NAME", "LEAKY", "LEAKY_FLASH", "CALLS", "register", "use_flash_emulation", "tiny_model"]

NAME = "flash_emulation"
# Dense causal attention over each whole row, whatever the positions say: packed sequences see the
# sequences before them in their row. LEAKY is not a flash name, so megakto does not flatten the rows
# for it; LEAKY_FLASH is (a flash kernel without varlen support), so the rows run as one and leak there.
LEAKY, LEAKY_FLASH = "leaky_causal", "flash_leaky"
CALLS: list[tuple[int, str]] = []


def _segments_from_cu(cu: torch.Tensor, length: int) -> torch.Tensor:
    """(length,) sequence index of every position of a flattened row, from cumulative lengths."""
    return torch.bucketize(torch.arange(length, device=cu.device), cu[1:].to(torch.long), right=True)


def _attend(module, query, key, value, allowed, scaling, softcap):
    """Softmax attention where ``allowed`` (B or 1, L, L) says which keys each query sees. Inputs are
    (B, H, L, D) as the models pass them; the output is (B, L, H, D) as flash kernels return it."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous()


def _flash_emulation(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     softcap=None, is_causal=None, position_ids=None, cu_seq_lens_q=None, max_length_q=None,
                     **kwargs):
    batch, length = query.shape[0], query.shape[2]
    q_idx = torch.arange(length, device=query.device)
    allowed = (q_idx[None, :] <= q_idx[:, None])[None]  # causal
    if sliding_window is not None:
        allowed = allowed & (q_idx[None, :] > q_idx[:, None] - sliding_window)[None]
    if attention_mask is not None:  # 1. padding: a query sees the unpadded keys of its row
        path = "unpad"
        allowed = allowed & attention_mask.bool()[:, None, :]
    elif cu_seq_lens_q is not None and max_length_q is not None:  # 2. sequences given
        path = "varlen"
        seg = _segments_from_cu(cu_seq_lens_q, length)
        allowed = allowed & (seg[:, None] == seg[None, :])[None]
    elif _is_packed_sequence(position_ids, batch):  # 3. one row whose positions restart
        path = "varlen"
        (cu, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        seg = _segments_from_cu(cu, length)
        allowed = allowed & (seg[:, None] == seg[None, :])[None]
    else:  # 4. dense causal over the whole row
        path = "dense"
    CALLS.append((batch, path))
    return _attend(module, query, key, value, allowed, scaling, softcap), None


def _leaky(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None,
           **kwargs):
    length = query.shape[2]
    q_idx = torch.arange(length, device=query.device)
    allowed = (q_idx[None, :] <= q_idx[:, None])[None]
    if sliding_window is not None:
        allowed = allowed & (q_idx[None, :] > q_idx[:, None] - sliding_window)[None]
    return _attend(module, query, key, value, allowed, scaling, softcap), None


def register() -> None:
    """Register the functions with transformers (idempotent). Flash names get the flash mask
    (None, or the 2D padding mask); the leaky one no mask at all."""
    AttentionInterface.register(NAME, _flash_emulation)
    AttentionInterface.register(LEAKY, _leaky)
    AttentionInterface.register(LEAKY_FLASH, _leaky)
    for name in (NAME, LEAKY_FLASH):
        AttentionMaskInterface.register(name, flash_attention_mask)


def use_flash_emulation(model, name: str = NAME) -> None:
    """Switch an HF model (loaded with another implementation) to ``name``."""
    register()
    model.config._attn_implementation = name


def tiny_model(folder, attn: str):
    """The float32 HF model in ``folder`` with attention ``attn`` (any name, these included), in eval mode."""
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager" if "flash" in attn else attn)
    if "flash" in attn:
        use_flash_emulation(model, attn)
    return model.eval()
