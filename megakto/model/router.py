"""A micro-batch's router logits -> its balancing loss and expert loads (megakto/kto/router_aux.py),
over the real tokens of its rows.

The logits come from the policy's own forward (:func:`megakto.model.forward.packed_completion_logps`
with ``router_logits=[]``: transformers' ``output_router_logits``, which every MoE family of
transformers 5 reports through its router, and which DeepSpeed's AutoEP keeps reporting when it
replaces the MoE blocks). A router sees the forward's tokens flattened, rows × positions; the
one-row layout of flash kernels (:func:`megakto.model.packed.for_attention`) flattens them in the
same order. The tokens that count are those of the micro-batch's target rows: a training forward
holds no KL rows (they are scored without grad, apart), so the mask only drops padding, and a
packed micro-batch counts the same tokens as its rows padded one per row.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megakto.data.packing import PackedBatch
from megakto.errors import ModelError
from megakto.kto.router_aux import RouterBalance, load_balancing_loss

__all__ = ["real_tokens", "micro_batch_balance"]


def real_tokens(batch: PackedBatch) -> torch.Tensor:
    """(R·L,) bool, True on the tokens of the batch's rows (not padding), in the routers' order."""
    return batch.segment_ids.reshape(-1) >= 0


def micro_batch_balance(router_logits: Sequence[torch.Tensor], batch: PackedBatch, top_k: int) -> RouterBalance:
    """The balancing loss of the forward that scored ``batch``, from its layers' ``router_logits``.

    Raises a one-line ModelError when the logits cannot be what the routers saw of ``batch``, or
    carry no gradient in a forward that builds one: reentrant gradient checkpointing runs the
    layers without autograd and would drop the loss's gradient silently (megakto checkpoints
    non-reentrantly; this catches a model that was set up otherwise)."""
    mask = real_tokens(batch)
    if not router_logits:
        raise ModelError("the policy's forward returned no router logits, so there is no balancing loss to add; "
                         "set kto.router_aux_coef=0")
    if router_logits[0].shape[0] != mask.numel():
        raise ModelError(f"the router logits cover {router_logits[0].shape[0]} tokens, the forward "
                         f"{mask.numel()}; the balancing loss cannot tell the rows' tokens apart; set "
                         "kto.router_aux_coef=0")
    if torch.is_grad_enabled() and not any(t.requires_grad for t in router_logits):
        raise ModelError("the router logits carry no gradient (reentrant gradient checkpointing?), so the balancing "
                         "loss would not train the router; checkpoint with use_reentrant=False or set "
                         "kto.router_aux_coef=0")
    return load_balancing_loss(router_logits, mask, top_k)
