"""A Hugging Face decoder-only model as a sequence of pipeline stages, without copying its layer code.

``embedding → decoder layer × L → final norm → output head``: each stage module wraps the model's
own submodule (``model.embed_tokens``, ``model.layers[i]``, ``model.norm``, ``lm_head``) and is
loaded on the rank that holds it, from the model folder's safetensors files, only its own tensors
(no rank ever builds the whole model). The stages pass one tuple::

    (hidden, position_ids, input_ids, completion_mask, segment_ids)

``hidden`` is the only float tensor, so it is the only one DeepSpeed's pipeline needs a gradient
for; the integer tensors ride along. Every decoder stage derives its rotary positions and its
attention mask from the segments' restarting ``position_ids`` with the model's own code
(``rotary_emb``, transformers' ``create_causal_mask`` / ``create_sliding_window_causal_mask``), as
the whole model does in one process, so packed rows stay block-diagonal on every stage. The head
stage returns the (S,) summed completion log-probs of the micro-batch's S sequences, scored in
chunks as :func:`megakto.model.forward.packed_completion_logps` does.

Pure torch and transformers: :mod:`megakto.distributed.engine` turns :func:`stage_specs` into
DeepSpeed ``LayerSpec`` / ``TiedLayerSpec`` objects and the ``PipelineModule``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megakto.data.packing import PackedBatch
from megakto.errors import ModelError
from megakto.kto.chunked_logps import token_logps

__all__ = ["PIPELINE_MODEL_TYPES", "StageSource", "StageSpec", "EmbedStage", "DecoderStage", "NormStage",
           "HeadStage", "stage_specs", "head_logps", "hf_names", "check_pipeline_model", "TIED_EMBED",
           "is_pipeline_name", "pipeline_to_hf", "hf_to_pipeline"]

# Families whose forward is embed → layers(mask, rotary) → norm → lm_head, checked against one
# process in tests/model/test_pipeline_stages.py.
PIPELINE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The mask functions' keyword interface (inputs_embeds, cache, position_ids) the stages call.
MIN_TRANSFORMERS_PP = "5.0"


def check_pipeline_model(config, pp: int, key: str = "model.path") -> None:
    """The model can be cut into ``pp`` stages: a supported family with at least ``pp`` layers, and a
    transformers whose mask functions the stages know."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS_PP):
        raise ModelError(f"parallel.pp_size={pp} needs transformers >= {MIN_TRANSFORMERS_PP} (the stages rebuild the "
                         f"attention mask with its masking_utils), but {transformers.__version__} is installed; "
                         f"pip install 'transformers>={MIN_TRANSFORMERS_PP}'")
    if config.model_type not in PIPELINE_MODEL_TYPES:
        raise ModelError(f"{key}: model_type {config.model_type!r} with parallel.pp_size={pp}: pipeline stages are "
                         f"built for {', '.join(PIPELINE_MODEL_TYPES)}; use ZeRO-3 or parallel.tp_size for it")
    if config.num_hidden_layers < pp:
        raise ModelError(f"{key}: {config.num_hidden_layers} decoder layers cannot fill parallel.pp_size={pp} "
                         f"stages; use parallel.pp_size <= {config.num_hidden_layers}")


class StageSource:
    """Where the stages come from: the model folder's config and weights, read lazily per stage.

    The model is built once on the ``meta`` device (no memory) as a template; each stage deep-copies
    its submodule from it, allocates it and loads its tensors from the safetensors files. Shared by
    the decoder stages of a rank, it also computes the rotary table and attention mask once per
    micro-batch for all of them.
    """

    def __init__(self, path: str, *, dtype: torch.dtype, attn_implementation: str | None,
                 trust_remote_code: bool = False, chunk_tokens: int | None = None):
        self.path, self.dtype, self.chunk_tokens = path, dtype, chunk_tokens
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            self.template = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                             trust_remote_code=trust_remote_code)
        self.config = self.template.config  # _attn_implementation resolved
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self._weight_map: dict[str, str] | None = None
        self._memo: tuple | None = None

    # -- weights
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> safetensors file, from the index (sharded) or the single file."""
        if self._weight_map is None:
            index = os.path.join(self.path, "model.safetensors.index.json")
            single = os.path.join(self.path, "model.safetensors")
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as fh:
                    self._weight_map = {k: os.path.join(self.path, v) for k, v in json.load(fh)["weight_map"].items()}
            elif os.path.isfile(single):
                from safetensors import safe_open

                with safe_open(single, framework="pt") as fh:
                    self._weight_map = {k: single for k in fh.keys()}
            else:
                raise ModelError(f"{self.path}: no model.safetensors(.index.json); pipeline stages load safetensors "
                                 "weights: re-save the model with save_pretrained(safe_serialization=True)")
        return self._weight_map

    def load(self, prefix: str) -> torch.nn.Module:
        """The template's submodule ``prefix``, allocated on CPU and loaded from the weights files."""
        from safetensors import safe_open

        module = copy.deepcopy(self.template.get_submodule(prefix)).to_empty(device="cpu")
        wanted = {f"{prefix}.{name}": name for name in module.state_dict()}
        by_file: dict[str, list[str]] = {}
        wmap = self.weight_map()
        missing = [k for k in wanted if k not in wmap]
        if missing:
            raise ModelError(f"{self.path}: the weights files lack {missing[:3]} (needed by the stage holding {prefix})")
        for key in wanted:
            by_file.setdefault(wmap[key], []).append(key)
        state = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as fh:
                for key in keys:
                    state[wanted[key]] = fh.get_tensor(key).to(self.dtype)
        module.load_state_dict(state, strict=True)
        return module

    def rotary(self) -> torch.nn.Module:
        rotary_type = type(self.template.model.rotary_emb)
        return rotary_type(config=self.config)

    # -- per micro-batch context of the decoder stages
    def context(self, rotary, hidden: torch.Tensor, position_ids: torch.Tensor, attention_type: str):
        """(cos, sin) and the attention mask for this micro-batch, computed once for all the
        rank's decoder stages (they see the same ``position_ids`` tensor)."""
        memo = self._memo
        if memo is None or memo[0] is not position_ids or memo[1] != hidden.dtype:
            memo = self._memo = (position_ids, hidden.dtype, rotary(hidden, position_ids), {})
        masks = memo[3]
        if attention_type not in masks:
            from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

            make = create_sliding_window_causal_mask if attention_type == "sliding_attention" else create_causal_mask
            masks[attention_type] = make(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                         position_ids=position_ids)
        return memo[2], masks[attention_type]

    def attention_type(self, index: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[index]
        # Mistral: one sliding window for every layer when set.
        return "sliding_attention" if getattr(self.config, "sliding_window", None) is not None else "full_attention"


class EmbedStage(torch.nn.Module):
    """Token ids -> embeddings; the other tensors pass through."""

    def __init__(self, source: StageSource):
        super().__init__()
        self.embed_tokens = source.load("model.embed_tokens")
        self._chunk = source.chunk_tokens  # for the tied head, which reuses this module on the last stage

    def forward(self, inputs):
        input_ids, position_ids, completion_mask, segment_ids = inputs
        return self.embed_tokens(input_ids), position_ids, input_ids, completion_mask, segment_ids


class DecoderStage(torch.nn.Module):
    """One of the model's own decoder layers, with the rotary table and the packed mask."""

    def __init__(self, source: StageSource, index: int):
        super().__init__()
        self.layer = source.load(f"model.layers.{index}")
        self.rotary = source.rotary()  # a buffer of inverse frequencies, not a checkpointed tensor
        self._source, self._attention_type = source, source.attention_type(index)

    def forward(self, inputs):
        hidden, position_ids, *rest = inputs
        rotary, mask = self._source.context(self.rotary, hidden, position_ids, self._attention_type)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary,
                         use_cache=False)
        return (out[0] if isinstance(out, tuple) else out), position_ids, *rest


class NormStage(torch.nn.Module):
    def __init__(self, source: StageSource):
        super().__init__()
        self.norm = source.load("model.norm")

    def forward(self, inputs):
        hidden, *rest = inputs
        return self.norm(hidden), *rest


class HeadStage(torch.nn.Module):
    """The untied output head; returns per-sequence log-probs (:func:`head_logps`)."""

    def __init__(self, source: StageSource):
        super().__init__()
        self.lm_head = source.load("lm_head")
        self._chunk = source.chunk_tokens

    def forward(self, inputs):
        return head_logps(self.lm_head.weight, inputs, self._chunk)


def head_logps(weight: torch.Tensor, inputs, chunk_tokens: int | None = None) -> torch.Tensor:
    """(S,) summed completion log-probs (fp32) of the micro-batch's sequences: logits only at the
    positions whose next token is a completion token, in chunks with a recomputing backward."""
    from megakto.model.forward import _scored, chunk_tokens_for

    hidden, position_ids, input_ids, completion_mask, segment_ids = inputs
    n = int(segment_ids.max()) + 1
    mask, targets, seg_of = _scored(PackedBatch(input_ids, position_ids, completion_mask, segment_ids, n))
    tok = token_logps(hidden[:, :-1][mask], weight, targets, chunk_size=chunk_tokens or chunk_tokens_for(weight.shape[0]))
    return torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, seg_of, tok)


def tied_head_forward(embed: EmbedStage, inputs) -> torch.Tensor:
    """The head of a model with tied embeddings: the embedding stage's matrix, on the last stage."""
    return head_logps(embed.embed_tokens.weight, inputs, embed._chunk)


@dataclass
class StageSpec:
    """One pipeline layer: a stage class and its arguments; ``tie`` names a tied module (the
    embedding, whose matrix the head of a tied model reuses); ``params`` its parameter count."""

    cls: type
    args: tuple
    params: int
    tie: str | None = None
    forward_fn: object = None


def stage_specs(source: StageSource) -> list[StageSpec]:
    """embedding, every decoder layer, the final norm, the head, with their parameter counts."""
    t = source.template

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    embed_params = count(t.model.embed_tokens)
    tie = "embed" if source.tied else None
    specs = [StageSpec(EmbedStage, (source,), embed_params, tie)]
    specs += [StageSpec(DecoderStage, (source, i), count(layer)) for i, layer in enumerate(t.model.layers)]
    specs.append(StageSpec(NormStage, (source,), count(t.model.norm)))
    if source.tied:
        specs.append(StageSpec(EmbedStage, (source,), embed_params, tie, forward_fn=tied_head_forward))
    else:
        specs.append(StageSpec(HeadStage, (source,), count(t.lm_head)))
    return specs


def hf_names(layer_index: int, num_layers: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pipeline layer file's tensors (pipeline layer ``layer_index`` of a model with ``num_layers``
    decoder layers) under their Hugging Face names."""
    if layer_index == 0:
        prefix, strip = "model.", ""
    elif layer_index <= num_layers:
        prefix, strip = f"model.layers.{layer_index - 1}.", "layer."
    elif layer_index == num_layers + 1:
        prefix, strip = "model.", ""
    elif layer_index == num_layers + 2:
        prefix, strip = "", ""
    else:
        raise ModelError(f"pipeline layer {layer_index} does not exist in a model of {num_layers} layers")
    out = {}
    for key, value in state.items():
        if strip and not key.startswith(strip):
            continue  # the decoder stage's rotary buffer is not a model weight
        out[prefix + key[len(strip):]] = value
    return out


# A tied embedding's parameter in the PipelineModule (TiedLayerSpec "embed"): one module on the
# first and the last stage, named apart from the numbered layers.
TIED_EMBED = "tied_modules.embed.embed_tokens.weight"


def is_pipeline_name(name: str) -> bool:
    """``name`` is a PipelineModule parameter's name (``<layer index>.<stage attribute>...``)."""
    return name == TIED_EMBED or name.split(".", 1)[0].isdigit()


def pipeline_to_hf(name: str) -> str:
    """A pipeline parameter's Hugging Face name. Each stage kind holds its own attribute
    (``embed_tokens``, ``layer``, ``norm``, ``lm_head``), so the layer index alone places it."""
    if name == TIED_EMBED:
        return "model.embed_tokens.weight"
    index, rest = name.split(".", 1)
    if rest.startswith("layer."):
        return f"model.layers.{int(index) - 1}.{rest[len('layer.'):]}"
    if rest.startswith(("embed_tokens.", "norm.")):
        return "model." + rest
    if rest.startswith("lm_head."):
        return rest
    raise ModelError(f"pipeline parameter {name}: not a stage of embed_tokens, layer, norm or lm_head")


def hf_to_pipeline(name: str, num_layers: int, tied: bool = False) -> str:
    """The PipelineModule parameter name of the Hugging Face parameter ``name`` (a model of
    ``num_layers`` decoder layers; ``tied``: its head is its embedding, :data:`TIED_EMBED`), the
    inverse of :func:`pipeline_to_hf`."""
    if name == "model.embed_tokens.weight":
        return TIED_EMBED if tied else "0.embed_tokens.weight"
    if name.startswith("model.layers."):
        index, rest = name[len("model.layers."):].split(".", 1)
        return f"{int(index) + 1}.layer.{rest}"
    if name.startswith("model.norm."):
        return f"{num_layers + 1}.{name[len('model.'):]}"
    if name.startswith("lm_head."):
        return f"{num_layers + 2}.{name}"
    raise ModelError(f"{name}: not a parameter of a pipeline stage (embedding, decoder layer, final norm, head)")
