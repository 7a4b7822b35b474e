"""Optimizer parameter groups and the learning-rate schedule (warmup, then cosine or linear decay)."""

from __future__ import annotations

import math

import torch

__all__ = ["lr_multiplier", "param_groups"]


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate used for optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as is standard for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # Under ZeRO-3 a partitioned parameter keeps its full shape in ``ds_shape``.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    # An empty group is left out (LoRA adapters are all matrices): ZeRO drops empty groups, and the
    # LR schedule must see as many groups as the optimizer DeepSpeed builds.
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
