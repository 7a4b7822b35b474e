"""Activations and temporaries of one micro-batch, per rank: what autograd keeps for backward, the
chunked log-prob blocks, and the vocabulary-block gradients.

Per token and decoder layer, the tensors a Llama-family layer (RMSNorm, rotary attention through
sdpa, SwiGLU MLP; Qwen2/3 and Mistral alike) saves for backward, in elements of the weight dtype
(``h`` hidden, ``q`` = heads·head_dim, ``kv`` = kv_heads·head_dim, ``i`` MLP width; under tensor
parallelism q, kv and i are the rank's shares, h is whole on every rank):

* two RMSNorms, each: its input, the normalised value and its scaled output (3h; in bf16 the input
  and the normalised value are fp32 copies: 8h bytes instead of 3h·2);
* attention: q, rotate_half(q), the rotated q, sdpa's output and o_proj's contiguous input (5q);
  k, rotate_half(k), the rotated k and v (4kv);
* MLP: gate, silu(gate), up and their product, down_proj's input (4i).

So one layer saves ``T·(norms + w·(5q + 4kv + 4i))`` bytes for T tokens. With gradient
checkpointing a layer keeps only its input (h·w per token) and one layer at a time is recomputed in
full during backward. Backward then needs about one more layer's worth for the gradients of that
layer's tensors. eager attention adds heads·L² scores and probabilities per packed row and layer;
sdpa (flash or memory-efficient kernels) adds none, only the block-diagonal mask (R·L² bytes,
shared by the layers).

Log-probs (``model.logps: chunked``): one (chunk, V_block) fp32 block plus its cast to the weight
dtype, with chunk = min(scored tokens, ``logps_chunk_tokens`` or 2^24 / V_block); the head's
gradient is one block's (V_block·h·w) with vocabulary blocks, the whole matrix without. A bf16 head
runs its matmuls in fp32 (:mod:`megakto.kto.chunked_logps`): no cast of the block, but the weight
block widened to fp32 (V_block·h·4) and, with grad, its gradient summed in fp32 then cast
(V_block·h·(4 + w)).
``model.logps: full``: fp32 logits of every token, their log-softmax kept for backward (2·T·V·4).

In a mixture-of-experts model a MoE layer saves its block's terms in place of the MLP's 4i (the
active experts' width k·i, the tokens' k copies, a shared expert, the fp32 router logits) and, under
expert parallelism, its all-to-all buffers while it runs: :mod:`megakto.planning.moe`.

Under Ulysses sequence parallelism (``sp`` ranks) a rank runs 1/sp of a micro-batch's tokens, laid
end to end as one row (:func:`sequence_shard_tokens`): every per-token term above is divided by sp.
Each attention layer's all-to-alls add, per local token, the exchanged q, k, v the core attention
saves (the same element count as the local ones; key-value heads replicated up to sp when there
are fewer) and the context before the return exchange (:func:`ulysses_bytes_per_token`); the
attention itself sees the whole row for heads/sp heads and needs no mask: flash_attention_2 (varlen)
and packed_sdpa (sdpa per packed sequence) both find the sequences from the positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from megakto.model.shape import ModelShape
from megakto.planning.moe import all_to_all_bytes, moe_live_bytes_per_token, moe_saved_bytes_per_token

__all__ = ["Tokens", "layer_bytes_per_token", "train_pass", "no_grad_pass", "logits_bytes", "sequence_shard_tokens",
           "ulysses_bytes_per_token"]

LOGITS_BLOCK_ELEMENTS = 1 << 24  # megakto.model.forward.LOGITS_BLOCK_ELEMENTS (tested equal)


@dataclass(frozen=True)
class Tokens:
    """One micro-batch on one rank: tokens fed to the model (padding included), scored completion
    tokens, and the packed rows' count and length (for the attention mask)."""

    tokens: int
    completion: int
    rows: int
    row_length: int


def sequence_shard_tokens(t: Tokens, sp: int) -> Tokens:
    """One rank's share of micro-batch ``t`` under ``sp`` ways of sequence parallelism: 1/sp of its
    tokens and scored tokens, in one row as long as the whole micro-batch (what the attention sees).

    >>> sequence_shard_tokens(Tokens(tokens=4096, completion=3000, rows=2, row_length=2048), 4)
    Tokens(tokens=1024, completion=750, rows=1, row_length=4096)
    """
    if sp == 1:
        return t
    return Tokens(-(-t.tokens // sp), -(-t.completion // sp), 1, t.tokens)


def ulysses_bytes_per_token(shape: ModelShape, *, w: int, sp: int) -> int:
    """Bytes Ulysses' all-to-alls add per local token and decoder layer (module docstring).

    >>> s = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
    ...                vocab=1000, embedding=64000, head=64000, layer_params=(1,))
    >>> ulysses_bytes_per_token(s, w=2, sp=4)   # 2·(2·64 + 2·max(2, 4)·16): kv heads replicated to 4
    512
    """
    if sp == 1:
        return 0
    kv = max(shape.kv_heads, sp) * shape.head_dim
    return w * (2 * shape.q_dim + 2 * kv)


def _norm_bytes(shape: ModelShape, w: int) -> int:
    return shape.hidden * (8 if w == 2 else 3 * w)


def _attention_norm_bytes(shape: ModelShape, w: int, tp: int) -> int:
    """A layer's norms and attention saved per token: what a MoE layer saves beside its block."""
    return 2 * _norm_bytes(shape, w) + w * (5 * shape.q_dim + 4 * shape.kv_dim) // tp


def layer_bytes_per_token(shape: ModelShape, *, w: int, tp: int = 1) -> int:
    """Bytes one decoder layer saves for backward per token.

    >>> s = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
    ...                vocab=1000, embedding=64000, head=64000, layer_params=(1,))
    >>> layer_bytes_per_token(s, w=4)   # 2·3·64·4 + 4·(5·64 + 4·32 + 4·128) = 1536 + 3840
    5376
    """
    local = w * (5 * shape.q_dim + 4 * shape.kv_dim + 4 * shape.intermediate) // tp
    return 2 * _norm_bytes(shape, w) + local


def _attention_bytes(shape: ModelShape, t: Tokens, *, w: int, tp: int, attn: str, sp: int = 1) -> int:
    """Per layer: eager's scores and probabilities; 0 for sdpa/flash kernels."""
    if attn != "eager":
        return 0
    return 2 * t.rows * (shape.heads // (tp * sp)) * t.row_length ** 2 * w


def logits_bytes(shape: ModelShape, scored: int, *, w: int, tp: int, logps: str, chunk_tokens: int | None,
                 block_rows: int, grad: bool) -> int:
    """The output head's temporaries for ``scored`` tokens (see the module docstring).

    >>> s = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
    ...                vocab=1000, embedding=64000, head=64000, layer_params=(1,))
    >>> logits_bytes(s, 100, w=4, tp=1, logps="chunked", chunk_tokens=None, block_rows=0, grad=True)
    1056000
    >>> logits_bytes(s, 100, w=2, tp=1, logps="chunked", chunk_tokens=None, block_rows=0, grad=True)
    1040000
    """
    v = shape.vocab // tp
    if logps == "full":
        return 2 * scored * v * 4 + (v * shape.hidden * w if grad else 0)
    block = block_rows or v
    chunk = min(scored, chunk_tokens or max(16, LOGITS_BLOCK_ELEMENTS // block))
    if w < 4:  # a half-precision head: fp32 logits from the weight block widened to fp32
        out = chunk * block * 4 + block * shape.hidden * 4
        return out + (block * shape.hidden * (4 + w) if grad else 0)  # fp32 gradient sum, then its cast
    out = chunk * block * (4 + w)  # 100 · 1000 · 8 = 800000
    if grad:
        out += block * shape.hidden * w  # the head block's gradient: 1000 · 64 · 4 = 256000
    return out


def train_pass(shape: ModelShape, t: Tokens, *, w: int, tp: int, checkpointing: bool, attn: str,
               sp: int = 1, ep: int = 1) -> dict:
    """The policy's forward with grad and its backward, one micro-batch (``sp``: this rank's shard of
    it): bytes by component. A MoE model's layers (:mod:`megakto.planning.moe`) save their block's
    terms in place of the dense MLP's; ``"moe"`` names the MoE terms the totals include, and the
    backward's working layer adds EP's all-to-all buffers (``ep`` > 1)."""
    t = sequence_shard_tokens(t, sp)
    extra = ulysses_bytes_per_token(shape, w=w, sp=sp)
    scores = _attention_bytes(shape, t, w=w, tp=tp, attn=attn, sp=sp)
    dense_layer = (layer_bytes_per_token(shape, w=w, tp=tp) + extra) * t.tokens + scores
    m = shape.moe
    n_moe = m.layers if m else 0
    moe_terms = moe_saved_bytes_per_token(shape, w=w) if m else {}
    moe_layer = (_attention_norm_bytes(shape, w, tp) + sum(moe_terms.values()) + extra) * t.tokens + scores
    per_layer = max(dense_layer if shape.layers > n_moe else 0, moe_layer if n_moe else 0)
    final = _norm_bytes(shape, w) * t.tokens + shape.hidden * w * t.completion  # final norm, scored hidden
    if checkpointing:
        kept = shape.layers * shape.hidden * w * t.tokens + per_layer  # layer inputs + one recomputed layer
    else:
        kept = (shape.layers - n_moe) * dense_layer + n_moe * moe_layer
    mask = t.rows * t.row_length ** 2 if attn != "flash_attention_2" and sp == 1 else 0
    a2a = all_to_all_bytes(shape, t.tokens, w=w, ep=ep)
    out = {"activations": kept + final + mask, "backward": per_layer + a2a}
    if m:  # how many MoE layers' saved tensors the totals hold: all (or the recomputed one) + the backward's
        count = (0 if checkpointing else n_moe) + (2 if checkpointing else 1) * (per_layer == moe_layer)
        out["moe"] = {f"MoE experts (top-{m.top_k} of {m.experts})": count * moe_terms["experts"] * t.tokens,
                      "MoE shared expert": count * moe_terms["shared expert"] * t.tokens,
                      "MoE router logits (fp32)": count * moe_terms["router logits"] * t.tokens,
                      "EP all-to-all buffers": a2a}
    return out


def no_grad_pass(shape: ModelShape, t: Tokens, *, w: int, tp: int, attn: str, sp: int = 1, ep: int = 1) -> int:
    """A forward without grad (reference, policy on the KL rows, the cache precompute): one layer's
    live tensors at a time (its input and residual, q/k/v and the MLP's gate, up and product; a MoE
    block's, EP's all-to-all buffers included, where it is the larger)."""
    t = sequence_shard_tokens(t, sp)
    attention = w * (2 * shape.hidden + (shape.q_dim + 2 * shape.kv_dim) // tp)
    per_token = w * (2 * shape.hidden + (shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate) // tp)
    if shape.moe:
        moe = attention + moe_live_bytes_per_token(shape, w=w, ep=ep)
        per_token = moe if shape.layers == shape.moe.layers else max(per_token, moe)
    per_token += ulysses_bytes_per_token(shape, w=w, sp=sp)
    mask = 0 if sp > 1 else t.rows * t.row_length ** 2  # Ulysses' core attentions take no mask
    return per_token * t.tokens + _attention_bytes(shape, t, w=w, tp=tp, attn=attn, sp=sp) // 2 + mask
