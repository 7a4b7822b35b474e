"""What a mixture-of-experts model adds to the plan, per rank: its parameters split into routed
experts and the rest, the experts' share under expert parallelism, the MoE block's activations and
the transients of its forward.

**Parameters.** ``E`` routed-expert parameters (every MoE layer's experts, :class:`MoeShape`), the
other ``P - E`` dense (attention, norms, embedding, head, the router, a shared expert). Under
``parallel.ep_size`` N (DeepSpeed AutoEP) each rank holds E/N of the experts (each MoE layer's
experts split over N ranks) and all the dense weights: every rank is data-parallel for the dense
part, whose ZeRO partitions span the dp ranks as in a dense model, while the experts' gradients and
optimizer states are reduced and partitioned over the expert-data-parallel group of dp/N ranks
(the ranks holding the same experts). Without EP the experts are ordinary parameters over dp.

**Activations**, per token and MoE layer, in place of a dense MLP's 4i (``k`` = top_k, ``i`` an
expert's width, ``h`` hidden, ``w`` bytes per element, ``n`` experts):

* the active experts' gate, silu(gate), up and their product: w·4·k·i (each token passes through
  k experts of width i, so the active width is k·i);
* the k copies of the token the experts take in and their outputs before the weighted sum (kept
  for the score's gradient): w·2·k·h;
* a shared expert of width s (Qwen2-MoE): w·4·s (its sigmoid gate's one element left out);
* the router logits, softmaxed in fp32 and kept for the balancing loss: 4·n bytes.

A forward without grad holds one layer's live tensors: w·(3·k·i + 2·k·h + 3·s) + 4·n per token.

**Expert parallelism's all-to-alls**: each MoE layer sends every token's k copies to the ranks
owning their experts and the outputs back, each a send and a receive buffer of T·k·h elements
(dispatch in and out, combine in and out): 4·T·k·h·w bytes while the layer runs (forward,
recompute, backward), one layer at a time, with routing balanced over the ranks (a rank receiving
more than its share of tokens needs more).

**ZeRO-3 gathers a MoE block whole**: DeepSpeed makes the block a leaf module (its default list
names Mixtral's and Qwen2/3-MoE's blocks; :func:`megakto.model.families.moe_block_classes` the
others), and transformers 5 fuses each layer's experts into one tensor per projection, so each
forward fetches every expert of the layer although a token uses k of them: the block's weights,
and in the backward the largest fused tensor's gradient before its reduce-scatter. Under EP the
rank gathers its own experts only (E/N of the layer, over the expert-data-parallel group) and the
router and shared expert as ordinary dense parameters.
"""

from __future__ import annotations

from megakto.model.shape import ModelShape

__all__ = ["expert_params", "moe_saved_bytes_per_token", "moe_live_bytes_per_token", "all_to_all_bytes",
           "block_gather_bytes", "expert_param_split"]


def expert_params(shape: ModelShape, ep: int = 1) -> int:
    """The routed experts' parameters one rank holds: E/ep (0 for a dense model).

    >>> from megakto.model.shape import MoeShape
    >>> m = MoeShape(experts=8, top_k=2, expert_intermediate=16, layers=2, expert_params=(8192, 4096))
    >>> s = ModelShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, head_dim=16, vocab=64,
    ...                embedding=2048, head=2048, layer_params=(1, 8192, 4096), moe=m)
    >>> expert_params(s, ep=4)   # 2 layers · (8192 + 4096) / 4
    6144
    """
    return shape.expert_total // ep


def expert_param_split(shape: ModelShape, params: int, ep: int) -> tuple[int, int]:
    """(dense, experts) of ``params`` (a rank's share of the model as the dense planner counts it):
    the experts E/ep, the rest dense."""
    experts = shape.expert_total
    return params - experts, experts // ep


def moe_saved_bytes_per_token(shape: ModelShape, *, w: int) -> dict[str, int]:
    """What one MoE block saves for backward per token (module docstring), by term.

    >>> from megakto.model.shape import MoeShape
    >>> m = MoeShape(experts=8, top_k=2, expert_intermediate=16, layers=2, expert_params=(8192, 4096),
    ...              shared_intermediate=24)
    >>> s = ModelShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, head_dim=16, vocab=64,
    ...                embedding=2048, head=2048, layer_params=(1,), moe=m)
    >>> moe_saved_bytes_per_token(s, w=2)   # 2·(4·2·16 + 2·2·32) = 512; 2·4·24 = 192; 4·8 = 32
    {'experts': 512, 'shared expert': 192, 'router logits': 32}
    """
    m = shape.moe
    return {"experts": w * (4 * m.top_k * m.expert_intermediate + 2 * m.top_k * shape.hidden),
            "shared expert": w * 4 * m.shared_intermediate, "router logits": 4 * m.experts}


def moe_live_bytes_per_token(shape: ModelShape, *, w: int, ep: int) -> int:
    """One MoE block's live tensors per token in a forward without grad, the all-to-all buffers
    under EP included.

    >>> from megakto.model.shape import MoeShape
    >>> m = MoeShape(experts=8, top_k=2, expert_intermediate=16, layers=2, expert_params=(8192, 4096))
    >>> s = ModelShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, head_dim=16, vocab=64,
    ...                embedding=2048, head=2048, layer_params=(1,), moe=m)
    >>> moe_live_bytes_per_token(s, w=2, ep=2)   # 2·(3·2·16 + 2·2·32) + 4·8 + 4·2·32·2 = 448 + 32 + 512
    992
    """
    m = shape.moe
    live = w * (3 * m.top_k * m.expert_intermediate + 2 * m.top_k * shape.hidden + 3 * m.shared_intermediate)
    return live + 4 * m.experts + all_to_all_bytes(shape, 1, w=w, ep=ep)


def all_to_all_bytes(shape: ModelShape, tokens: int, *, w: int, ep: int) -> int:
    """EP's dispatch and combine buffers of one MoE layer for ``tokens`` tokens: 4·T·k·h·w (0
    without EP or experts).

    >>> from megakto.model.shape import MoeShape
    >>> m = MoeShape(experts=8, top_k=2, expert_intermediate=16, layers=2, expert_params=(8192, 4096))
    >>> s = ModelShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, head_dim=16, vocab=64,
    ...                embedding=2048, head=2048, layer_params=(1,), moe=m)
    >>> all_to_all_bytes(s, 100, w=2, ep=4)   # 4 · 100 · 2 · 32 · 2
    51200
    """
    if shape.moe is None or ep == 1:
        return 0
    return 4 * tokens * shape.moe.top_k * shape.hidden * w


def block_gather_bytes(shape: ModelShape, *, w: int, ep: int, grad: bool) -> int:
    """ZeRO-3's gather of one MoE block (module docstring): all its experts and the rest of the
    block without EP, the rank's E/ep experts of the layer under EP; with ``grad`` the largest fused
    expert tensor's gradient too.

    >>> from megakto.model.shape import MoeShape
    >>> m = MoeShape(experts=8, top_k=2, expert_intermediate=16, layers=2, expert_params=(8192, 4096),
    ...              block_params=256)
    >>> s = ModelShape(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, head_dim=16, vocab=64,
    ...                embedding=2048, head=2048, layer_params=(1,), moe=m)
    >>> block_gather_bytes(s, w=2, ep=1, grad=True)   # 2·(8192 + 4096 + 256) + 2·8192
    41472
    >>> block_gather_bytes(s, w=2, ep=4, grad=False)  # 2·(8192 + 4096) / 4
    6144
    """
    m = shape.moe
    if m is None:
        return 0
    gathered = m.per_layer // ep + (m.block_params if ep == 1 else 0)
    return w * (gathered + (max(m.expert_params) // ep if grad else 0))
