"""AutoTP's universal-checkpoint info under ZeRO-3 (engines._fix_replicated_maps): deepspeed 0.19.8
maps each parameter AutoTP leaves whole from ``param.shape``, the empty ZeRO-3 placeholder, so
``ds_to_universal`` stopped on megakto's TP checkpoints; the map is rebuilt from ``ds_shape``."""

import torch
from deepspeed.checkpoint.affine import ParamAffineMap, replicated_map

from megakto.distributed._deepspeed.engines import _fix_replicated_maps


def _module():
    module = torch.nn.Module()
    module.norm = torch.nn.Parameter(torch.empty(0))  # partitioned away: ZeRO-3's placeholder
    module.norm.ds_shape = torch.Size([64])
    module.proj = torch.nn.Parameter(torch.empty(0))
    module.proj.ds_shape = torch.Size([32, 64])  # this tp rank's shard of a [64, 64] weight
    return module


def test_a_replicated_parameters_map_gets_its_whole_shape():
    proj_map = {"logical_shape": [64, 64], "ranks": {0: {"shard_shape": [32, 64]}, 1: {"shard_shape": [32, 64]}}}
    info = {"tp_replicated_parameter_patterns": [r"^norm$"],
            "affine_map": {"version": 1, "params": {r"^norm$": replicated_map((0,), 2).to_dict(),
                                                    r"^proj$": proj_map}}}
    _fix_replicated_maps(_module(), info)
    fixed = ParamAffineMap.from_dict(info["affine_map"]["params"][r"^norm$"])
    assert info["affine_map"]["params"][r"^norm$"] == replicated_map((64,), 2).to_dict()
    norm = torch.arange(64.0)
    assert torch.equal(fixed.rebuild({0: norm, 1: norm}), norm)  # what ds_to_universal does with it
    assert info["affine_map"]["params"][r"^proj$"] is proj_map  # a split parameter's map is AutoTP's own


def test_info_without_maps_is_left_alone():
    info = {"universal_checkpoint_version": 0.4}
    _fix_replicated_maps(_module(), info)
    assert info == {"universal_checkpoint_version": 0.4}
