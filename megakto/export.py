"""ZeRO checkpoint -> Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

The weights come from DeepSpeed's own consolidation (``zero_to_fp32``: the fp32 master weights,
gathered from every rank's partitions); the model config, generation config, tokenizer and chat
template come from ``checkpoints/hf_base``, which the trainer copies from the run once, at its
first save, so a checkpoint directory converts without the original model folder. The folder is
written in the dtype the run trained in (recorded in each tag's manifest): the engine's bf16
weights are exactly bf16(fp32 master), so the export's logits equal the engine's.

A tensor-parallel checkpoint holds one set of ZeRO files per tp rank (``mp_rank_XX``): each is
consolidated on its own, then the shards are joined along the dimension AutoTP split
(:mod:`megakto.model.tp_merge`, whole shapes from ``hf_base``'s config).

A pipeline checkpoint (``pp_size`` > 1 in its manifest) holds one file per pipeline layer
(``layer_LL-model_states.pt``: embedding, decoder layers, final norm, untied head), written by the
first data-parallel rank of the stage that owns it; they are renamed to Hugging Face names
(:func:`megakto.model.pipeline_stages.hf_names`). They hold the engine's module weights, in the
dtype the run trained in.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from megakto import checkpoint, universal
from megakto.distributed import engine
from megakto.errors import ConfigError, ModelError
from megakto.model.pipeline_stages import hf_names
from megakto.model.tp_merge import full_shapes, merge_tp_shards, tied_aliases

__all__ = ["BASE", "LORA_CONFIG", "probe_batch", "save_hf_base", "resolve_checkpoint", "export_checkpoint",
           "write_hf_folder", "write_lora_folders", "is_lora_checkpoint", "check_export", "checkpoint_state_dict"]

BASE = checkpoint.HF_BASE
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


LORA_CONFIG = "adapter_config.json"  # in hf_base: the checkpoint holds a LoRA policy (peft's config)


def save_hf_base(ckpt_dir: str, model_path: str, tokenizer, *, trust_remote_code: bool, lora=None) -> str:
    """Copy the run's model config, generation config and tokenizer into ``ckpt_dir/hf_base``
    once (rank 0). The config is re-read from ``model_path`` rather than taken from the live
    model, whose dropout the trainer has switched off. ``lora``: the policy's peft ``LoraConfig``,
    saved beside them, so that the export knows the weights' adapter layout."""
    target = os.path.join(ckpt_dir, BASE)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    tmp = os.path.join(ckpt_dir, checkpoint.TMP_PREFIX + BASE)
    shutil.rmtree(tmp, ignore_errors=True)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config.save_pretrained(tmp)
    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # the model folder has none: derive it from the model config, as HF does
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if lora is not None:
        lora.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return target


def resolve_checkpoint(path: str, tag: str | None = None) -> str:
    """A checkpoints/ directory (its newest tag that passes ``checkpoint.verify``, or ``tag``) or
    a tag directory -> the verified tag directory to convert; ConfigError (one line) otherwise."""
    path = os.path.abspath(path)
    tags = [path]
    if tag is not None:
        tags = [os.path.join(path, tag)]
    elif checkpoint.read_manifest(path) is None and checkpoint.complete_tags(path):
        tags = [p for _, p in reversed(checkpoint.complete_tags(path))]
    for path in tags:  # the newest that passes (sizes, checksums, pickles); a damaged newer one is named
        why = checkpoint.verify(path, collective=False)
        if why is None or path == tags[-1]:
            break
        print(f"megakto: warning: skipping {path}: {why}", file=sys.stderr, flush=True)
    if why is not None:
        raise ConfigError(f"{path}: not a complete megakto checkpoint: {why}; pass output_dir/checkpoints "
                          "or one of its step-* directories")
    base = os.path.join(os.path.dirname(path), BASE)
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise ConfigError(f"{path}: no {base}/config.json next to it (the run's model config and tokenizer)")
    return path


def is_lora_checkpoint(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(os.path.dirname(os.path.normpath(tag_dir)), BASE, LORA_CONFIG))


def export_checkpoint(tag_dir: str, out_dir: str | None, *, dtype: str | None = None,
                      trust_remote_code: bool = False, adapter_dir: str | None = None) -> str | None:
    """Convert a complete tag directory into an HF folder at ``out_dir``; returns ``out_dir``.
    ``dtype``: None = the dtype the run trained in. A LoRA checkpoint gives the merged model
    (W + (alpha / r) B A) in ``out_dir`` and, with ``adapter_dir``, the adapter alone in peft's
    format there (either may be None)."""
    tag_dir = os.path.normpath(tag_dir)
    dtype = dtype or checkpoint.read_manifest(tag_dir).get("dtype", "float32")
    state_dict = checkpoint_state_dict(tag_dir, trust_remote_code=trust_remote_code)
    base = os.path.join(os.path.dirname(tag_dir), BASE)
    if is_lora_checkpoint(tag_dir):
        write_lora_folders(state_dict, base, out_dir, adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        return out_dir
    if adapter_dir is not None:
        raise ConfigError(f"{tag_dir}: not a LoRA checkpoint (no {BASE}/{LORA_CONFIG}); there is no adapter to export")
    return write_hf_folder(state_dict, base, out_dir, dtype=dtype, trust_remote_code=trust_remote_code)


def _lora_model(base: str, state_dict: dict[str, torch.Tensor], dtype: str, trust_remote_code: bool):
    """The peft model of ``base``'s config and LoRA config holding ``state_dict``, on CPU."""
    from peft import LoraConfig, get_peft_model

    model = _build(base, {}, dtype, trust_remote_code, meta=False, allow_missing=True)
    config = LoraConfig.from_pretrained(base)
    base_name = config.base_model_name_or_path  # the run's model.path
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    peft_model.peft_config["default"].base_model_name_or_path = base_name  # not hf_base, which holds no weights
    weights = {k: v.to(_DTYPES[dtype]) for k, v in state_dict.items()}
    result = peft_model.load_state_dict(weights, strict=False)
    names = dict(peft_model.named_parameters())
    loaded = {names[k].data_ptr() for k in weights if k in names}
    missing = [k for k in result.missing_keys if k in names and names[k].data_ptr() not in loaded]
    if result.unexpected_keys or missing:
        raise ModelError(f"{base}: the LoRA checkpoint does not fit its config: unexpected {result.unexpected_keys[:3]}, "
                         f"missing {missing[:3]}")
    return peft_model.eval()


def write_lora_folders(state_dict: dict[str, torch.Tensor], base: str, out_dir: str | None, adapter_dir: str | None,
                       *, dtype: str, trust_remote_code: bool = False) -> None:
    """A LoRA checkpoint's adapter alone (peft's ``save_pretrained``: adapter_config.json and
    adapter_model.safetensors, loadable with ``PeftModel.from_pretrained`` on the base model; fp32,
    as the optimizer's masters) and the merged model as a plain Hugging Face folder (peft's
    ``merge_and_unload``, computed in fp32 and written in ``dtype``)."""
    with engine.outside_zero3():
        peft_model = _lora_model(base, state_dict, "float32", trust_remote_code)
        if adapter_dir is not None:
            peft_model.save_pretrained(adapter_dir)
        if out_dir is not None:
            merged = peft_model.merge_and_unload().to(_DTYPES[dtype])
            os.makedirs(out_dir, exist_ok=True)
            merged.save_pretrained(out_dir, safe_serialization=True)
            _copy_base_files(base, out_dir)


_LAYER_FILE = re.compile(r"^layer_(\d+)-(?:model_\d+-)?model_states\.pt$")


def _pipeline_state_dict(tag_dir: str, trust_remote_code: bool) -> dict[str, torch.Tensor]:
    """A pipeline checkpoint's per-layer files joined under Hugging Face names."""
    config = AutoConfig.from_pretrained(os.path.join(os.path.dirname(tag_dir), BASE), trust_remote_code=trust_remote_code)
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


def checkpoint_state_dict(tag_dir: str, *, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a complete tag directory under Hugging Face names (fp32 masters of ZeRO
    checkpoints, tensor-parallel shards joined; a pipeline's module weights; a universal
    checkpoint's fp32 files). Offline (no process group)."""
    tag_dir = os.path.normpath(tag_dir)
    manifest = checkpoint.read_manifest(tag_dir) or {}
    if manifest.get("pp_size", 1) > 1:
        return _pipeline_state_dict(tag_dir, trust_remote_code)
    if manifest.get("format") == checkpoint.UNIVERSAL:  # one fp32 file per parameter, shards joined
        return universal.fp32_state_dict(tag_dir)
    shards = engine.zero_fp32_shards(os.path.dirname(tag_dir), os.path.basename(tag_dir))
    if len(shards) == 1:
        return shards[0]
    base = os.path.join(os.path.dirname(tag_dir), BASE)
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    with engine.outside_zero3():
        shapes = full_shapes(config, trust_remote_code=trust_remote_code)
        aliases = tied_aliases(config, trust_remote_code=trust_remote_code)
    try:
        return merge_tp_shards(shards, shapes, warn=lambda m: print(f"megakto: warning: {tag_dir}: {m}",
                                                                    file=sys.stderr, flush=True), aliases=aliases)
    except ModelError as err:
        raise ModelError(f"{tag_dir}: {err}") from None


def _build(base: str, state_dict: dict[str, torch.Tensor], dtype: str, trust_remote_code: bool, *,
           meta: bool, allow_missing: bool = False):
    """The model of ``base``'s config holding ``state_dict`` (cast to ``dtype``). ``meta``: built
    without allocating a throw-away random init (for writing; non-persistent buffers such as rotary
    frequencies stay unallocated, which save_pretrained does not need); else a runnable CPU model."""
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}: allowed values are {', '.join(_DTYPES)}")
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    with torch.device("meta" if meta else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
    weights = {k: v.to(_DTYPES[dtype]) for k, v in state_dict.items()}
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


def write_hf_folder(state_dict: dict[str, torch.Tensor], base: str, out_dir: str, *, dtype: str,
                    trust_remote_code: bool = False) -> str:
    """Safetensors of ``state_dict`` + ``base``'s config, generation config and tokenizer files."""
    with engine.outside_zero3():
        model = _build(base, state_dict, dtype, trust_remote_code, meta=True)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
    _copy_base_files(base, out_dir)
    return out_dir


def _copy_base_files(base: str, out_dir: str) -> None:
    """Generation config, tokenizer and chat template from ``hf_base`` (the config came with the model)."""
    for name in os.listdir(base):
        if name not in ("config.json", LORA_CONFIG) and os.path.isfile(os.path.join(base, name)):
            shutil.copy2(os.path.join(base, name), os.path.join(out_dir, name))


def probe_batch(vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, 24), generator=gen)


@torch.no_grad()
def check_export(out_dir: str, tag_dir: str, *, trust_remote_code: bool = False) -> float:
    """Max |logits(exported folder) - logits(checkpointed weights)| on a fixed batch, in the
    export's dtype. The folder goes through ``from_pretrained``, as a user would load it."""
    tag_dir = os.path.normpath(tag_dir)
    state_dict = checkpoint_state_dict(tag_dir, trust_remote_code=trust_remote_code)
    base = os.path.join(os.path.dirname(tag_dir), BASE)
    with engine.outside_zero3():
        exported = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=trust_remote_code).eval()
        dtype = str(next(exported.parameters()).dtype).removeprefix("torch.")
        if is_lora_checkpoint(tag_dir) and dtype == "float32":  # the checkpointed adapters, not merged
            reference = _lora_model(base, state_dict, dtype, trust_remote_code)
        elif is_lora_checkpoint(tag_dir):  # a rounded export: what it should hold, merged in fp32 then rounded
            reference = _lora_model(base, state_dict, "float32", trust_remote_code).merge_and_unload().to(_DTYPES[dtype])
        else:
            reference = _build(base, state_dict, dtype, trust_remote_code, meta=False)
        batch = probe_batch(exported.config.vocab_size)
        diff = exported(input_ids=batch).logits.float() - reference(input_ids=batch).logits.float()
    return float(diff.abs().max())
