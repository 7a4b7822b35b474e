"""A model's sizes from its config.json alone: the causal-LM class built on the meta device (no
memory, no weights), its parameters counted by component for the memory plan, or listed by name
to check a checkpoint against before anything is converted or loaded."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from megakto.errors import ModelError
from megakto.model.load import _meta_model
from megakto.model.families import num_experts
from megakto.model.lora import base_name
from megakto.model.vocab_blocks import merge_vocab_blocks
from megakto.model.shape import ModelShape, MoeShape

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
    moe = _moe_shape(text, layers)
    first = next((i for i, block in enumerate(layers) if _experts(block) is not None), 0)
    layer = tuple(p.numel() for p in layers[first].parameters())
    seen = {id(emb), id(head)} | {id(p) for block in layers for p in block.parameters()}
    other = tuple(p.numel() for p in model.parameters() if id(p) not in seen)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=len(layers),
                      heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                      head_dim=head_dim, vocab=emb.shape[0], embedding=emb.numel(),
                      head=0 if head is emb else head.numel(), layer_params=layer, other_params=other,
                      model_type=text.model_type, moe=moe)


def _experts(block):
    """A decoder layer's routed experts: the ``experts`` child of its MoE block (the convention of
    :func:`megakto.model.families.moe_block_classes`), None in a dense layer."""
    return next((m.experts for m in block.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)), None)


def _moe_shape(text, layers) -> MoeShape | None:
    """The MoE part of a model whose layers hold routed experts (Qwen2/3-MoE: ``num_experts``,
    ``moe_intermediate_size``, ``shared_expert_intermediate_size``; Mixtral: ``num_local_experts``,
    experts as wide as ``intermediate_size``), None for a dense one."""
    sparse = [block for block in layers if _experts(block) is not None]
    if not sparse:
        return None
    block = sparse[0]
    experts = _experts(block)
    owner = next(m for m in block.modules() if getattr(m, "experts", None) is experts)
    expert_params = tuple(p.numel() for p in experts.parameters())
    dense = [b for b in layers if _experts(b) is None]
    return MoeShape(
        experts=num_experts(text), top_k=text.num_experts_per_tok,
        expert_intermediate=getattr(text, "moe_intermediate_size", None) or text.intermediate_size,
        layers=len(sparse), expert_params=expert_params,
        block_params=sum(p.numel() for p in owner.parameters()) - sum(expert_params),
        shared_intermediate=getattr(text, "shared_expert_intermediate_size", None) or 0,
        dense_layer_params=sum(p.numel() for p in dense[0].parameters()) if dense else 0)
