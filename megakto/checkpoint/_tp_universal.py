"""The universal form of a ZeRO-3 checkpoint made loadable at another tensor-parallel size.

DeepSpeed's ``ds_to_universal`` writes a ZeRO-3 checkpoint saved without tensor parallelism as one
flat tensor per parameter and state (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``),
and a tensor-parallel one as ``{"param": tensor, ...}`` dicts. deepspeed 0.19.8's ZeRO-3 universal
loader cuts a whole tensor into this rank's AutoTP shard only when it finds a dict: a flat file is
partitioned whole over the data-parallel ranks, so a ZeRO-3 DP checkpoint resumed under TP2 stopped
with "start (81920) + length (8192) exceeds dimension size (86016)". :func:`shape_flat_tensors`
rewrites every flat file as ``{"param": tensor}`` in its parameter's whole shape (the trainer
state's ``param_shapes``, whole without tensor parallelism), which every loader takes: ZeRO-3's at
any tp size, ZeRO-1/2's, and :func:`megakto.checkpoint.weights.universal_weights`.
"""

from __future__ import annotations

import os

import torch

from megakto.checkpoint._expert_universal import STATE_KEYS
from megakto.distributed import engine

__all__ = ["SHAPED", "shape_flat_tensors"]

SHAPED = "shaped"  # the universal manifest's key: True once every state file is a {"param": tensor} dict


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
