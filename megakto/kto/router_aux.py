"""The router's load-balancing loss of a mixture-of-experts policy, over plain tensors.

Switch Transformer's auxiliary loss (Fedus et al. 2022, eqs. 4-6), in the form transformers'
``load_balancing_loss_func`` gives it for Mixtral, Qwen2/3-MoE, OLMoE, Qwen3-Next, ...:

    aux = E · Σ_e f_e · P_e

with E experts, f_e the share of tokens whose top-k choice includes expert e (Σ_e f_e = k) and
P_e the mean router probability of e (softmax over the router's logits). Like transformers, the
layers are pooled: f_e and P_e are means over every (layer, token) pair, expert e of one layer
counting together with expert e of the others. Only P_e carries a gradient (f_e counts a top-k
choice). aux is k at perfect balance (f_e = k/E, P_e = 1/E) and approaches E as the router
sends every token to the same k experts.

What is new here is the token set: transformers weighs tokens by a 2-D attention mask (and fails
on the 4-D block-diagonal masks of packed rows); :func:`load_balancing_loss` takes a 1-D mask over
the flattened tokens instead, so a packed micro-batch counts exactly the real tokens of its rows,
the same set as those rows padded one per row. The softmax runs in float32, as the routers
themselves pick their top-k (``softmax(..., dtype=float)``). How the per-micro-batch value enters
the step's loss (once per micro-batch, scaled like eq. (7)'s rows) is the step's decision
(megakto/step.py).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["RouterBalance", "load_balancing_loss"]


class RouterBalance(NamedTuple):
    loss: torch.Tensor  # () E · Σ_e f_e P_e over the masked tokens of every layer (carries the gradient)
    counts: torch.Tensor  # (L, E) float64, detached: masked tokens that picked expert e in layer l (top-k)
    tokens: torch.Tensor  # () float64, detached: the masked tokens (the same in every layer)


def load_balancing_loss(router_logits: Sequence[torch.Tensor], token_mask: torch.Tensor, top_k: int) -> RouterBalance:
    """The balancing loss and the per-layer expert loads of one forward.

    Args:
        router_logits: one (T, E) tensor per MoE layer: the router's logits for the forward's T
            flattened tokens (rows × positions, row-major), before the softmax.
        token_mask: (T,) or any shape of T elements, nonzero on the tokens that count.
        top_k: experts each token is sent to.

    No tensor is read back to the host (no ``nonzero``, no ``item``): the mask weighs the tokens.
    A forward without masked tokens gives loss 0.
    """
    mask = token_mask.reshape(-1).to(device=router_logits[0].device, dtype=torch.float32)
    experts = router_logits[0].shape[-1]
    counts, prob_sums = [], []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (T, k)
        counts.append(torch.zeros(experts, device=mask.device).scatter_add_(
            0, chosen.reshape(-1), mask.repeat_interleave(top_k)))  # integers: exact in any order
        prob_sums.append((probs * mask[:, None]).sum(0))
    tokens = mask.sum()
    pairs = tokens * len(router_logits)  # (layer, token) pairs pooled
    share = torch.stack(counts).sum(0) / pairs.clamp(min=1)  # f_e
    mean_prob = torch.stack(prob_sums).sum(0) / pairs.clamp(min=1)  # P_e
    loss = experts * (share * mean_prob).sum()
    return RouterBalance(loss, torch.stack(counts).detach().double(), tokens.detach().double())
