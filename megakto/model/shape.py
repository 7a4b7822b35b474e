"""What the memory plan needs to know about a model: its sizes and its parameters' element counts,
grouped by component. Pure: :func:`megakto.model.meta.model_shape` fills it from a config.json
(the model built on the meta device, so any architecture counts exactly); tests build it by hand.
It lives with the model code that fills it, so that :mod:`megakto.planning` reads it from here and
``model/`` imports nothing from ``planning/``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelShape"]


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only causal LM.

    ``layer_params``: the element count of each parameter of one decoder layer (all layers alike);
    ``embedding``/``head``: the (V, H) matrices (``head`` 0 when tied to the embedding);
    ``other_params``: the rest outside the layers (the final norm, biases of the head).
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

    @property
    def tied(self) -> bool:
        return self.head == 0

    @property
    def per_layer(self) -> int:
        return sum(self.layer_params)

    @property
    def total(self) -> int:
        """Parameters, a tied matrix counted once."""
        return self.embedding + self.head + self.layers * self.per_layer + sum(self.other_params)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def components(self) -> dict[str, int]:
        """Parameters per component, in model order."""
        return {"embedding": self.embedding, "layers": self.layers * self.per_layer,
                "head": self.head, "other": sum(self.other_params)}

    def largest_layer_param(self) -> int:
        """The largest single parameter inside a decoder layer (what ZeRO-3 gathers at once there)."""
        return max(self.layer_params, default=0)
