"""A model's sizes from its config.json alone: the causal-LM class built on the meta device (no
memory, no weights), its parameters counted by component for the memory plan, or listed by name
to check a checkpoint against before anything is converted or loaded."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from megakto.errors import ModelError
from megakto.model.load import _meta_model
from megakto.model.lora import base_name
from megakto.model.vocab_blocks import merge_vocab_blocks
from megakto.model.shape import ModelShape

__all__ = ["model_shape", "shape_of", "param_shapes", "hf_shapes"]


def _meta(path: str, trust_remote_code: bool, key: str):
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types; the user needs the one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{key}={path}: cannot load the model config: {first}") from None
    try:
        return _meta_model(config, None, trust_remote_code)
    except Exception as err:
        raise ModelError(f"{key}={path}: cannot build the model on the meta device: {err}") from None


def model_shape(path: str, *, trust_remote_code: bool = False, key: str = "model.path") -> ModelShape:
    """:class:`ModelShape` of the model folder (or hub name) ``path``; needs only its config.json."""
    return shape_of(_meta(path, trust_remote_code, key))


def param_shapes(path: str, *, trust_remote_code: bool = False, key: str = "model.path") -> dict[str, list[int]]:
    """Every parameter's shape under its Hugging Face name (a tied head once, under the embedding's
    name, as ``named_parameters`` lists it); needs only config.json."""
    return {name: list(p.shape) for name, p in _meta(path, trust_remote_code, key).named_parameters()}


def hf_shapes(recorded: dict[str, list[int]]) -> dict[str, list[int]]:
    """The parameter shapes a checkpoint recorded (the trained module's names) under the base
    model's Hugging Face names, comparable with :func:`param_shapes`: peft's LoRA names reduced to
    the base model's (the adapters' own dropped), vocabulary blocks joined (their rows summed)."""
    base = {base_name(name): shape for name, shape in recorded.items() if base_name(name) is not None}
    meta = {name: torch.empty(shape, device="meta") for name, shape in base.items()}
    return {name: list(t.shape) for name, t in merge_vocab_blocks(meta).items()}


def shape_of(model) -> ModelShape:
    """Count a (meta or real) HF causal LM's parameters: embedding, one decoder layer, head, rest."""
    text = model.config.get_text_config()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else None
    if layers is None or not len(layers):
        raise ModelError(f"{type(model).__name__}: no decoder layers under model.layers; the memory plan "
                         "reads Llama-family layouts (Llama, Mistral, Qwen2/3, ...)")
    layer = tuple(p.numel() for p in layers[0].parameters())
    seen = {id(emb), id(head)} | {id(p) for block in layers for p in block.parameters()}
    other = tuple(p.numel() for p in model.parameters() if id(p) not in seen)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=len(layers),
                      heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                      head_dim=head_dim, vocab=emb.shape[0], embedding=emb.numel(),
                      head=0 if head is emb else head.numel(), layer_params=layer, other_params=other,
                      model_type=text.model_type)
