"""A checkpoint's weights under Hugging Face names, one reader per layout: the one place that reads
them, for the export (:mod:`megakto.checkpoint.export`, tools/zero_to_hf.py) and the tests alike.
Offline: one process, no process group; memory for one full fp32 copy of the model.

* **ZeRO 1-3** (:func:`zero_weights`): DeepSpeed's own consolidation (``zero_to_fp32``: the fp32
  master weights, gathered from every rank's partitions).
* **Tensor parallelism** (:func:`tp_weights`): one set of ZeRO files per tp rank (``mp_rank_XX``),
  each consolidated on its own, then the shards joined along the dimension AutoTP split
  (:mod:`megakto.model.tp_merge`, whole shapes from ``hf_base``'s config).
* **Pipelines** (:func:`pipeline_weights`, ``pp_size`` > 1 in the manifest): one file per pipeline
  layer (``layer_LL-model_states.pt``: embedding, decoder layers, final norm, untied head), written
  by the first data-parallel rank of the stage that owns it, renamed to Hugging Face names
  (:func:`megakto.model.pipeline_stages.hf_names`). They hold the engine's module weights, in the
  dtype the run trained in.
* **Universal** (:func:`universal_weights`): DeepSpeed's one fp32 file per parameter
  (:mod:`megakto.checkpoint.universal`) and the frozen parameters (a LoRA run's base) taken from the
  source's model states at the conversion, checked against their manifest checksum; AutoEP's
  expert names and a pipeline's layer names are renamed to the Hugging Face ones
  (:func:`megakto.model.expert_names.autoep_to_hf`, :func:`megakto.model.pipeline_stages.pipeline_to_hf`).
* **Expert parallelism** (:func:`expert_weights`, ``ep_size`` > 1 in the manifest): DeepSpeed
  AutoEP's experts are spread over the ranks, and neither zero_to_fp32 nor the engine's
  ``save_16bit_model`` gathers them (deepspeed 0.19.8, measured: zero_to_fp32 refuses the expert
  files; ``save_16bit_model`` writes rank 0's experts alone under ZeRO-2 and raises under ZeRO-3).
  The universal conversion does: the tag's universal form is read (the one a resume made beside
  it, else one converted into a temporary folder beside the tag and deleted after).
* **LoRA** (:func:`lora_model`, recognised by :func:`is_lora_checkpoint`): any of the above under
  peft's names, read into the peft model of ``hf_base``'s LoRA config.

:func:`read_weights` picks the reader from the manifest.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megakto.checkpoint import universal
from megakto.checkpoint._expert_universal import load_param
from megakto.checkpoint._pipeline_universal import to_hf_names
from megakto.checkpoint.manifest import HF_BASE, TMP_PREFIX, UNIVERSAL, read_manifest
from megakto.checkpoint.resume import load_state
from megakto.distributed import engine
from megakto.errors import ConfigError, ModelError
from megakto.model.expert_names import autoep_to_hf, is_autoep
from megakto.model.pipeline_stages import hf_names
from megakto.model.tp_merge import full_shapes, merge_tp_shards, tied_aliases
from megakto.model.vocab_blocks import merge_vocab_blocks

__all__ = ["DTYPES", "LORA_CONFIG", "read_weights", "zero_weights", "tp_weights", "pipeline_weights",
           "universal_weights", "expert_weights", "is_lora_checkpoint", "lora_model", "hf_model"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_CONFIG = "adapter_config.json"  # in hf_base: the checkpoint holds a LoRA policy (peft's config)
_LAYER_FILE = re.compile(r"^layer_(\d+)-(?:model_\d+-)?model_states\.pt$")


def _base(tag_dir: str) -> str:
    return os.path.join(os.path.dirname(tag_dir), HF_BASE)


def read_weights(tag_dir: str, *, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a complete tag directory under Hugging Face names, by its layout: a pipeline's
    module weights, a universal checkpoint's fp32 files, or the fp32 masters of ZeRO files (their
    tensor-parallel shards joined)."""
    tag_dir = os.path.normpath(tag_dir)
    manifest = read_manifest(tag_dir) or {}
    if manifest.get("pp_size", 1) > 1:
        return pipeline_weights(tag_dir, trust_remote_code=trust_remote_code)
    if manifest.get("format") == UNIVERSAL:  # one fp32 file per parameter, shards joined
        return universal_weights(tag_dir)
    if manifest.get("ep_size", 1) > 1:
        return expert_weights(tag_dir)
    return zero_weights(tag_dir, trust_remote_code=trust_remote_code)


def zero_weights(tag_dir: str, *, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of ZeRO files; one set per tensor-parallel rank is joined
    (:func:`tp_weights`)."""
    tag_dir = os.path.normpath(tag_dir)
    shards = engine.zero_fp32_shards(os.path.dirname(tag_dir), os.path.basename(tag_dir))
    if len(shards) == 1:
        return shards[0]
    return tp_weights(tag_dir, shards, trust_remote_code=trust_remote_code)


def tp_weights(tag_dir: str, shards: list[dict[str, torch.Tensor]], *,
               trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """``shards`` (one consolidated state dict per tensor-parallel rank of ``tag_dir``, in rank
    order) joined into whole tensors, given the shapes and ties of ``hf_base``'s config."""
    config = AutoConfig.from_pretrained(_base(tag_dir), trust_remote_code=trust_remote_code)
    with engine.outside_zero3():
        shapes = full_shapes(config, trust_remote_code=trust_remote_code)
        aliases = tied_aliases(config, trust_remote_code=trust_remote_code)
    try:
        return merge_tp_shards(shards, shapes, warn=lambda m: print(f"megakto: warning: {tag_dir}: {m}",
                                                                    file=sys.stderr, flush=True), aliases=aliases)
    except ModelError as err:
        raise ModelError(f"{tag_dir}: {err}") from None


def pipeline_weights(tag_dir: str, *, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """A pipeline checkpoint's per-layer files joined under Hugging Face names."""
    tag_dir = os.path.normpath(tag_dir)
    config = AutoConfig.from_pretrained(_base(tag_dir), trust_remote_code=trust_remote_code)
    layers = sorted((int(m.group(1)), name) for name in os.listdir(tag_dir) if (m := _LAYER_FILE.match(name)))
    want = config.num_hidden_layers + (2 if getattr(config, "tie_word_embeddings", False) else 3)
    if [i for i, _ in layers] != list(range(want)):
        raise ModelError(f"{tag_dir}: pipeline layer files {[i for i, _ in layers]}, expected 0..{want - 1} for "
                         f"{config.num_hidden_layers} decoder layers")
    engine.check_deepspeed_pickles(tag_dir, [name for _, name in layers])
    state: dict[str, torch.Tensor] = {}
    for index, name in layers:
        layer = engine.weights_only_load(os.path.join(tag_dir, name), map_location="cpu")
        state.update(hf_names(index, config.num_hidden_layers, layer))
    return state


def universal_weights(tag_dir: str, zero: str | None = None) -> dict[str, torch.Tensor]:
    """The fp32 weights of a universal checkpoint (``zero/<name>/fp32.pt``: ``{"param": tensor, ...}``
    from ZeRO-1/2 and for AutoEP's experts; a flat tensor from ZeRO-3, shaped here by the parameter
    shapes in the trainer state), under Hugging Face names. ``zero``: the ``zero/`` folder, if not
    ``tag_dir``'s own."""
    zero = zero or os.path.join(tag_dir, "zero")
    shapes = load_state(tag_dir, 0).get("param_shapes") or {}
    state = {}
    for name in sorted(os.listdir(zero)):
        path = os.path.join(zero, name, "fp32.pt")
        if os.path.isfile(path):
            state[name] = load_param(path, name, shapes)
    if not state:
        raise ModelError(f"{tag_dir}: no zero/<parameter>/fp32.pt files (not a universal checkpoint)")
    for name, tensor in universal.frozen_weights(tag_dir).items():  # a LoRA run's base, checksummed
        state.setdefault(name, tensor)
    state = to_hf_names(state)  # a pipeline's universal form (megakto.checkpoint._pipeline_universal)
    if is_autoep(state):
        try:
            state = autoep_to_hf(state)
        except ModelError as err:
            raise ModelError(f"{tag_dir}: {err}") from None
    return merge_vocab_blocks(state)


def expert_weights(tag_dir: str) -> dict[str, torch.Tensor]:
    """An expert-parallel checkpoint's weights, all experts gathered, through its universal form
    (see the module). Disk for one fp32 copy of the model and Adam's two moments while it runs."""
    tag_dir = os.path.normpath(tag_dir)
    beside = universal.universal_dir(tag_dir)
    if universal.converted(tag_dir, beside) or universal.converted(tag_dir, beside, "hf"):
        return universal_weights(beside)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + "export-", dir=os.path.dirname(tag_dir)) as tmp:
        engine.to_universal(tag_dir, os.path.join(tmp, "universal"))
        return universal_weights(tag_dir, os.path.join(tmp, "universal", "zero"))


def is_lora_checkpoint(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(_base(os.path.normpath(tag_dir)), LORA_CONFIG))


def lora_model(base: str, state_dict: dict[str, torch.Tensor], dtype: str, trust_remote_code: bool):
    """The peft model of ``base``'s config and LoRA config holding ``state_dict``, on CPU."""
    from peft import LoraConfig, get_peft_model

    model = hf_model(base, {}, dtype, trust_remote_code, meta=False, allow_missing=True)
    config = LoraConfig.from_pretrained(base)
    base_name = config.base_model_name_or_path  # the run's model.path
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    peft_model.peft_config["default"].base_model_name_or_path = base_name  # not hf_base, which holds no weights
    weights = {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}
    result = peft_model.load_state_dict(weights, strict=False)
    names = dict(peft_model.named_parameters())
    loaded = {names[k].data_ptr() for k in weights if k in names}
    missing = [k for k in result.missing_keys if k in names and names[k].data_ptr() not in loaded]
    if result.unexpected_keys or missing:
        raise ModelError(f"{base}: the LoRA checkpoint does not fit its config: unexpected {result.unexpected_keys[:3]}, "
                         f"missing {missing[:3]}")
    return peft_model.eval()


def hf_model(base: str, state_dict: dict[str, torch.Tensor], dtype: str, trust_remote_code: bool, *,
             meta: bool, allow_missing: bool = False):
    """The model of ``base``'s config holding ``state_dict`` (cast to ``dtype``). ``meta``: built
    without allocating a throw-away random init (for writing; non-persistent buffers such as rotary
    frequencies stay unallocated, which save_pretrained does not need); else a runnable CPU model."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: allowed values are {', '.join(DTYPES)}")
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    with torch.device("meta" if meta else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    weights = {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}
    result = model.load_state_dict(weights, strict=False, assign=meta)
    model.tie_weights()
    if result.unexpected_keys:
        raise ConfigError(f"{base}: checkpoint tensors the model does not have: {result.unexpected_keys[:5]}")
    # A missing key is fine only if it is tied to one that was loaded (lm_head -> embeddings).
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in weights}
    missing = [n for n in result.missing_keys if model.get_parameter(n).data_ptr() not in loaded] \
        if not meta else [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing and not allow_missing:
        raise ConfigError(f"{base}: model tensors missing from the checkpoint: {missing[:5]}")
    return model.eval()
