"""The hint at the end of an unknown-config-key error: megakto's name for what the user meant.

Recipes are often carried over from TRL (``KTOConfig``) or Hugging Face ``TrainingArguments``, so
their names are mapped to megakto's keys, whatever section they were written in; names with no
one-to-one equivalent get a sentence saying what to set instead. Otherwise the hint is the same
leaf name in another section (``train.lr`` -> ``optim.lr``), else the nearest spelling over every
key and alias.
"""

from __future__ import annotations

import difflib
from typing import Optional

__all__ = ["unknown_key_hint"]

_EPOCHS = ("megakto counts optimizer steps, not epochs: set train.max_steps "
           "(rows per step = train.global_batch_size)")

# Other trainers' names -> a megakto key, or (no equivalent) a sentence saying what to use.
_ALIASES: dict[str, str] = {
    "learning_rate": "optim.lr",
    "per_device_train_batch_size": "train.micro_batch_size",
    "train_batch_size": "train.micro_batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "eval_batch_size": "train.eval_batch_size",
    "batch_size": "train.global_batch_size",
    "max_completion_length": "data.max_length",
    "max_seq_length": "data.max_length",
    "warmup_steps": "optim.warmup_steps",
    "max_grad_norm": "optim.grad_clip",
    "gradient_clipping": "optim.grad_clip",
    "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas",
    "beta1": "optim.betas",
    "beta2": "optim.betas",
    "adam_epsilon": "optim.eps",
    "lr_scheduler_type": "optim.schedule",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep_last",
    "resume_from_checkpoint": "train.resume",
    "model_name_or_path": "model.path",
    "tokenizer_name_or_path": "model.tokenizer_path",
    "ref_model_name_or_path": "ref.path",
    "torch_dtype": "model.dtype",
    "dataset_num_proc": "data.num_proc",
    "padding_free": "data.packing",
    "precompute_ref_log_probs": "ref.mode",
    "max_steps": "train.max_steps",
    "ddp_timeout": "dist.timeout_minutes",
    "num_train_epochs": _EPOCHS,
    "num_epochs": _EPOCHS,
    "epochs": _EPOCHS,
    "gradient_accumulation_steps": "gradient accumulation follows from the batch sizes: set "
                                   "train.global_batch_size (= train.micro_batch_size x accumulation "
                                   "steps x data-parallel ranks)",
    "warmup_ratio": "set optim.warmup_steps (a number of steps, not a fraction of train.max_steps)",
    "bf16": "set model.dtype=bfloat16",
    "fp16": "float16 is not supported: set model.dtype=bfloat16 or float32",
    "deepspeed": "the DeepSpeed JSON is the launcher's --deepspeed argument, not a config key",
}

# Spellings closer than this to a known name are suggested (difflib's ratio).
_CUTOFF = 0.75


def _target(leaf: str, prefix: str, by_leaf: dict[str, list[str]]) -> Optional[str]:
    """The key or sentence for a known leaf or alias name; the same section's key first."""
    keys = by_leaf.get(leaf)
    if keys:
        return next((k for k in keys if k == prefix + leaf), keys[0])
    return _ALIASES.get(leaf)


def _phrase(target: str, key: str) -> Optional[str]:
    if target == key:
        return None
    return f"did you mean '{target}'?" if " " not in target else target


def unknown_key_hint(key: str, prefix: str, names: list[str], sections: list[str],
                     leaves: list[str]) -> Optional[str]:
    """The hint for unknown ``key``, whose first unknown part follows ``prefix`` (``"train."``);
    ``names`` are the valid names there, ``sections`` those that are sections, ``leaves`` every
    dotted leaf key. None when nothing is close."""
    parts = key[len(prefix):].split(".")
    if len(parts) > 1:
        # Meant as a section: a misspelt one (trian.max_steps -> train).
        close = difflib.get_close_matches(parts[0], sections, n=1)
        if close:
            return f"did you mean '{prefix}{close[0]}'?"
    leaf = parts[-1].strip().lower().replace("-", "_")
    by_leaf: dict[str, list[str]] = {}
    for k in leaves:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    target = _target(leaf, prefix, by_leaf)
    if target is None:
        # Nearest spelling over every leaf name and alias; on a tie, this section's own name.
        pool = set(by_leaf) | set(_ALIASES)
        score = {n: difflib.SequenceMatcher(None, leaf, n).ratio() for n in pool}
        best = max(pool, key=lambda n: (score[n], n in names, n))
        if score[best] >= _CUTOFF:
            target = _target(best, prefix, by_leaf)
    return _phrase(target, key) if target else None
