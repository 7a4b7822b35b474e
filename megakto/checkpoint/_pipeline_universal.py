"""The universal form of a checkpoint across pipeline layouts: a pipeline's parameters under the
model's Hugging Face names, or a data-parallel checkpoint's under a pipeline's.

DeepSpeed's ``ds_to_universal`` converts a pipeline checkpoint of ZeRO-1 as it does any other: the
fp32 masters and Adam's moments are in the optimizer partitions of each stage, named by the
``PipelineModule``'s layer indices (``2.layer.self_attn.q_proj.weight``), which do not depend on
how the layers are split over stages. A pipeline engine of any degree and data-parallel size loads
that folder with ``checkpoint.load_universal``; a run without pipeline needs the Hugging Face names
(``model.layers.1.self_attn.q_proj.weight``) and a pipeline run resuming a data-parallel checkpoint
the reverse (:func:`megakto.model.pipeline_stages.pipeline_to_hf`, ``hf_to_pipeline``): each
parameter's folder is renamed, its files (whole tensors, or ZeRO-3's flat ones, shaped by the name's
recorded shape) are unchanged.

Each pipeline rank records only its stage's parameter shapes in its trainer state; the universal
folder's ``trainer_state_rank0.pt`` gets them all (:func:`saved_shapes`), under its names.

Pipelines run ZeRO 0/1, so a ZeRO-3 checkpoint resumed under a pipeline (or the reverse) changes
ZeRO stage too: the universal folder is made loadable by either stage's engine
(:func:`megakto.distributed.engine.universal_any_stage`).
"""

from __future__ import annotations

import glob
import os

import torch

from megakto.checkpoint.manifest import state_file
from megakto.distributed import engine
from megakto.model.pipeline_stages import hf_to_pipeline, is_pipeline_name, pipeline_to_hf

__all__ = ["saved_shapes", "to_hf_names", "rename_layers"]


def saved_shapes(tag_dir: str) -> dict[str, list[int]]:
    """Every parameter shape the trainer states of ``tag_dir`` recorded, all ranks together (a
    pipeline rank records its stage's alone), under the checkpoint's own names."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(tag_dir, "trainer_state_rank*.pt"))):
        shapes.update(engine.weights_only_load(path, map_location="cpu").get("param_shapes") or {})
    return shapes


def to_hf_names(shapes: dict) -> dict:
    """``shapes`` (or any mapping by parameter name) with a pipeline's names made Hugging Face's."""
    return {pipeline_to_hf(n) if is_pipeline_name(n) else n: v for n, v in shapes.items()}


def _renamer(names: list[str], layers: str):
    if layers == "hf":
        return lambda n: pipeline_to_hf(n) if is_pipeline_name(n) else n
    decoders = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    tied = "lm_head.weight" not in names
    return lambda n: n if is_pipeline_name(n) else hf_to_pipeline(n, max(decoders, default=-1) + 1, tied)


def rename_layers(universal_dir: str, tag_dir: str, layers: str) -> None:
    """Put the parameters of the universal folder ``universal_dir`` (converted from ``tag_dir``)
    under ``layers`` names (``pipeline`` or ``hf``), and every recorded shape of ``tag_dir`` in its
    ``trainer_state_rank0.pt`` under the same names."""
    zero = os.path.join(universal_dir, "zero")
    names = sorted(n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n)))
    rename = _renamer(names, layers)
    for name in names:
        if rename(name) != name:
            os.rename(os.path.join(zero, name), os.path.join(zero, rename(name)))
    path = os.path.join(universal_dir, state_file(0))
    state = engine.weights_only_load(path, map_location="cpu")
    shapes = saved_shapes(tag_dir)
    if shapes:
        state["param_shapes"] = {rename(n): s for n, s in shapes.items()}
        torch.save(state, path)

