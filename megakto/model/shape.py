"""What the memory plan needs to know about a model: its sizes and its parameters' element counts,
grouped by component. Pure: :func:`megakto.model.meta.model_shape` fills it from a config.json
(the model built on the meta device, so any architecture counts exactly); tests build it by hand.
It lives with the model code that fills it, so that :mod:`megakto.planning` reads it from here and
``model/`` imports nothing from ``planning/``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelShape", "MoeShape"]


@dataclass(frozen=True)
class MoeShape:
    """The mixture-of-experts part of a decoder (Qwen2/3-MoE, Mixtral, ...): each MoE layer's MLP is a
    block of ``experts`` routed experts of width ``expert_intermediate``, each token sent to ``top_k``
    of them, beside a router (and, in Qwen2-MoE, a shared expert of width ``shared_intermediate``
    with its sigmoid gate).

    ``expert_params``: the routed experts' tensors of one MoE layer, all experts (transformers 5
    fuses them: ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)); ``block_params``: the rest of
    the block (router, shared expert and its gate), dense parameters. ``layers``: decoder layers
    with a MoE block; the others (``mlp_only_layers``, ``decoder_sparse_step``) have a dense MLP of
    the model's ``intermediate`` width and ``dense_layer_params`` parameters each."""

    experts: int
    top_k: int
    expert_intermediate: int
    layers: int
    expert_params: tuple[int, ...]
    block_params: int = 0
    shared_intermediate: int = 0
    dense_layer_params: int = 0

    @property
    def per_layer(self) -> int:
        """The routed experts' parameters of one MoE layer."""
        return sum(self.expert_params)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only causal LM.

    ``layer_params``: the element count of each parameter of one decoder layer (all layers alike);
    ``embedding``/``head``: the (V, H) matrices (``head`` 0 when tied to the embedding);
    ``other_params``: the rest outside the layers (the final norm, biases of the head);
    ``moe``: the mixture-of-experts part, None for a dense model. In a MoE model ``layer_params``
    are a MoE layer's (its experts included) and the layers without a MoE block count
    ``moe.dense_layer_params`` each.
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    embedding: int
    head: int
    layer_params: tuple[int, ...]
    other_params: tuple[int, ...] = ()
    model_type: str = ""
    moe: MoeShape | None = None

    @property
    def tied(self) -> bool:
        return self.head == 0

    @property
    def per_layer(self) -> int:
        return sum(self.layer_params)

    @property
    def layers_total(self) -> int:
        """Parameters of all decoder layers (MoE layers and, in a MoE model, the dense ones)."""
        if self.moe is None:
            return self.layers * self.per_layer
        return self.moe.layers * self.per_layer + (self.layers - self.moe.layers) * self.moe.dense_layer_params

    @property
    def expert_total(self) -> int:
        """The routed experts' parameters over all layers (0 for a dense model)."""
        return 0 if self.moe is None else self.moe.layers * self.moe.per_layer

    @property
    def total(self) -> int:
        """Parameters, a tied matrix counted once."""
        return self.embedding + self.head + self.layers_total + sum(self.other_params)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def components(self) -> dict[str, int]:
        """Parameters per component, in model order."""
        return {"embedding": self.embedding, "layers": self.layers_total,
                "head": self.head, "other": sum(self.other_params)}

    def largest_layer_param(self) -> int:
        """The largest single parameter inside a decoder layer (what ZeRO-3 gathers at once there),
        the routed experts' fused tensors left out (a MoE block is gathered whole:
        :mod:`megakto.planning.moe`)."""
        rest = list(self.layer_params)
        for n in self.moe.expert_params if self.moe else ():
            rest.remove(n)
        return max(rest, default=0)
