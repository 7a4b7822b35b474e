"""The universal form of a checkpoint for a tensor-parallel run (``convert(..., for_tp=True)``).

DeepSpeed's ``ds_to_universal`` writes a ZeRO-3 checkpoint saved without tensor parallelism as one
flat tensor per parameter and state (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``),
and a tensor-parallel one as ``{"param": tensor, ...}`` dicts. deepspeed 0.19.8's ZeRO-3 universal
loader cuts a whole tensor into this rank's AutoTP shard only when it finds a dict: a flat file is
partitioned whole over the data-parallel ranks, so a ZeRO-3 DP checkpoint resumed under TP2 stopped
with "start (81920) + length (8192) exceeds dimension size (86016)". :func:`shape_flat_tensors`
rewrites every flat file as ``{"param": tensor}`` in its parameter's whole shape (the trainer
state's ``param_shapes``, whole without tensor parallelism), which every loader takes: ZeRO-3's at
any tp size, ZeRO-1/2's, and :func:`megakto.checkpoint.weights.universal_weights`. Every
conversion of a checkpoint without tensor parallelism now shapes them already
(:func:`megakto.distributed._deepspeed.convert.any_stage`, from the ZeRO-3 model states' shapes),
so here it rewrites only what that left flat and otherwise reads each file once more.

A data-parallel run splits its vocabulary matrices into row blocks (``model.vocab_block_rows``,
``auto`` for a large vocabulary: ``<m>.vocab_blocks.<k>.weight``), a tensor-parallel run never does
(AutoTP splits the head by vocabulary rows instead). :func:`join_vocab_blocks` joins each module's
blocks into its Hugging Face tensor (``<m>.weight``), weights and both Adam moments alike, so such
a checkpoint resumes under tensor parallelism.
"""

from __future__ import annotations

import os
import shutil

import torch

from megakto.checkpoint._expert_universal import STATE_KEYS, load_param
from megakto.distributed import engine
from megakto.model.vocab_blocks import BLOCKS, merge_vocab_blocks

__all__ = ["FOR_TP", "shape_flat_tensors", "join_vocab_blocks"]

_STEP = "step.pt"  # ZeRO-1/2's per-parameter step counter

# The universal manifest's key: True when converted for a tensor-parallel run (every state file a
# {"param": tensor} dict, the vocabulary blocks joined).
FOR_TP = "for_tensor_parallel"


def shape_flat_tensors(universal_dir: str, shapes: dict[str, list[int]]) -> int:
    """Rewrite each flat state file of ``universal_dir/zero`` as ``{"param": tensor}`` shaped by
    ``shapes`` (whole shapes under the folder's names); returns how many. A file of a name without
    a recorded shape stays flat (a checkpoint saved before shapes were recorded)."""
    zero = os.path.join(universal_dir, "zero")
    shaped = 0
    for name in sorted(os.listdir(zero)):
        if name not in shapes or not os.path.isdir(os.path.join(zero, name)):
            continue
        for key in STATE_KEYS:
            path = os.path.join(zero, name, f"{key}.pt")
            if not os.path.isfile(path):
                continue
            loaded = engine.weights_only_load(path, map_location="cpu")
            if isinstance(loaded, torch.Tensor):
                torch.save({"param": loaded.view(shapes[name]).contiguous()}, path)
                shaped += 1
    return shaped


def join_vocab_blocks(universal_dir: str) -> bool:
    """Rewrite ``universal_dir/zero``'s vocabulary blocks as whole Hugging Face tensors (see the
    module), after :func:`shape_flat_tensors`; returns whether there were any."""
    zero = os.path.join(universal_dir, "zero")
    blocked = sorted(n for n in os.listdir(zero) if f".{BLOCKS}." in n and os.path.isdir(os.path.join(zero, n)))
    if not blocked:
        return False
    joined: dict[str, dict[str, torch.Tensor]] = {}
    for key in STATE_KEYS:
        state = {n: load_param(os.path.join(zero, n, f"{key}.pt"), n, {}) for n in blocked
                 if os.path.isfile(os.path.join(zero, n, f"{key}.pt"))}
        for name, tensor in merge_vocab_blocks(state).items():
            joined.setdefault(name, {})[key] = tensor
    step = os.path.join(zero, blocked[0], _STEP)
    for name, files in joined.items():
        os.makedirs(os.path.join(zero, name))
        for key, tensor in files.items():
            torch.save({"param": tensor.contiguous()}, os.path.join(zero, name, f"{key}.pt"))
        if os.path.isfile(step):
            shutil.copy2(step, os.path.join(zero, name, _STEP))
    for name in blocked:
        shutil.rmtree(os.path.join(zero, name))
    return True
