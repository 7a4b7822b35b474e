"""A checkpoint -> a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

The weights come from :mod:`megakto.checkpoint.weights` (every layout: ZeRO, tensor-parallel
shards joined, pipeline layer files, universal, LoRA); the model config, generation config,
tokenizer and chat template come from ``checkpoints/hf_base``, which the trainer copies from the
run once, at its first save, so a checkpoint directory converts without the original model
folder. The folder is written in the dtype the run trained in (recorded in each tag's manifest):
the engine's bf16 weights are exactly bf16(fp32 master), so the export's logits equal the
engine's.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from megakto.checkpoint.housekeeping import complete_tags
from megakto.checkpoint.manifest import HF_BASE, TMP_PREFIX, read_manifest, verify
from megakto.checkpoint.weights import DTYPES, LORA_CONFIG, hf_model, is_lora_checkpoint, lora_model, read_weights
from megakto.distributed import engine
from megakto.errors import ConfigError

__all__ = ["BASE", "probe_batch", "save_hf_base", "resolve_checkpoint", "export_checkpoint", "write_hf_folder",
           "write_lora_folders", "check_export"]

BASE = HF_BASE


def save_hf_base(ckpt_dir: str, model_path: str, tokenizer, *, trust_remote_code: bool, lora=None) -> str:
    """Copy the run's model config, generation config and tokenizer into ``ckpt_dir/hf_base``
    once (rank 0). The config is re-read from ``model_path`` rather than taken from the live
    model, whose dropout the trainer has switched off. ``lora``: the policy's peft ``LoraConfig``,
    saved beside them, so that the export knows the weights' adapter layout."""
    target = os.path.join(ckpt_dir, BASE)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    tmp = os.path.join(ckpt_dir, TMP_PREFIX + BASE)
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
    """A checkpoints/ directory (its newest tag that passes
    :func:`~megakto.checkpoint.manifest.verify`, or ``tag``) or a tag directory -> the verified tag
    directory to convert; ConfigError (one line) otherwise. Offline (the tools)."""
    path = os.path.abspath(path)
    tags = [path]
    if tag is not None:
        tags = [os.path.join(path, tag)]
    elif read_manifest(path) is None and complete_tags(path):
        tags = [p for _, p in reversed(complete_tags(path))]
    for path in tags:  # the newest that passes (sizes, checksums, pickles); a damaged newer one is named
        why = verify(path, collective=False)
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


def export_checkpoint(tag_dir: str, out_dir: str | None, *, dtype: str | None = None,
                      trust_remote_code: bool = False, adapter_dir: str | None = None) -> str | None:
    """Convert a complete tag directory into an HF folder at ``out_dir``; returns ``out_dir``.
    ``dtype``: None = the dtype the run trained in. A LoRA checkpoint gives the merged model
    (W + (alpha / r) B A) in ``out_dir`` and, with ``adapter_dir``, the adapter alone in peft's
    format there (either may be None)."""
    tag_dir = os.path.normpath(tag_dir)
    dtype = dtype or read_manifest(tag_dir).get("dtype", "float32")
    state_dict = read_weights(tag_dir, trust_remote_code=trust_remote_code)
    base = os.path.join(os.path.dirname(tag_dir), BASE)
    if is_lora_checkpoint(tag_dir):
        write_lora_folders(state_dict, base, out_dir, adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        return out_dir
    if adapter_dir is not None:
        raise ConfigError(f"{tag_dir}: not a LoRA checkpoint (no {BASE}/{LORA_CONFIG}); there is no adapter to export")
    return write_hf_folder(state_dict, base, out_dir, dtype=dtype, trust_remote_code=trust_remote_code)


def write_lora_folders(state_dict: dict[str, torch.Tensor], base: str, out_dir: str | None, adapter_dir: str | None,
                       *, dtype: str, trust_remote_code: bool = False) -> None:
    """A LoRA checkpoint's adapter alone (peft's ``save_pretrained``: adapter_config.json and
    adapter_model.safetensors, loadable with ``PeftModel.from_pretrained`` on the base model; fp32,
    as the optimizer's masters) and the merged model as a plain Hugging Face folder (peft's
    ``merge_and_unload``, computed in fp32 and written in ``dtype``)."""
    with engine.outside_zero3():
        peft_model = lora_model(base, state_dict, "float32", trust_remote_code)
        if adapter_dir is not None:
            peft_model.save_pretrained(adapter_dir)
        if out_dir is not None:
            merged = peft_model.merge_and_unload().to(DTYPES[dtype])
            os.makedirs(out_dir, exist_ok=True)
            merged.save_pretrained(out_dir, safe_serialization=True)
            _copy_base_files(base, out_dir)


def write_hf_folder(state_dict: dict[str, torch.Tensor], base: str, out_dir: str, *, dtype: str,
                    trust_remote_code: bool = False) -> str:
    """Safetensors of ``state_dict`` + ``base``'s config, generation config and tokenizer files."""
    with engine.outside_zero3():
        model = hf_model(base, state_dict, dtype, trust_remote_code, meta=True)
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
    state_dict = read_weights(tag_dir, trust_remote_code=trust_remote_code)
    base = os.path.join(os.path.dirname(tag_dir), BASE)
    with engine.outside_zero3():
        exported = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=trust_remote_code).eval()
        dtype = str(next(exported.parameters()).dtype).removeprefix("torch.")
        if is_lora_checkpoint(tag_dir) and dtype == "float32":  # the checkpointed adapters, not merged
            reference = lora_model(base, state_dict, dtype, trust_remote_code)
        elif is_lora_checkpoint(tag_dir):  # a rounded export: what it should hold, merged in fp32 then rounded
            reference = lora_model(base, state_dict, "float32", trust_remote_code).merge_and_unload().to(DTYPES[dtype])
        else:
            reference = hf_model(base, state_dict, dtype, trust_remote_code, meta=False)
        batch = probe_batch(exported.config.vocab_size)
        diff = exported(input_ids=batch).logits.float() - reference(input_ids=batch).logits.float()
    return float(diff.abs().max())
