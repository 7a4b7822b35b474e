"""The ``expert_parallel`` section of a DeepSpeed config (AutoEP), filled from ``parallel.ep_size``
and checked, beside :mod:`megakto.distributed.ds_config`. Plain dicts, no ``import deepspeed``."""

import json

from megakto.distributed.parallel import ParallelDims
from megakto.errors import ConfigError

__all__ = ["fill_expert_parallel"]

# AutoEP settings that need CUDA (Triton, DeepEP, CUDA streams): megakto leaves them at DeepSpeed's
# defaults, which are off, and refuses a JSON that turns one on while running on CPU.
_EP_CUDA_ONLY = {"comm_backend": "comm", "combine_impl": ("auto", "weighted_sum", "legacy_bmm"),
                 "async_split_plan": False, "gate_up_impl": "separate"}


def fill_expert_parallel(ds: dict, dims: ParallelDims, preset: str | None, on_gpu: bool, source: str) -> None:
    """``expert_parallel`` from ``parallel.ep_size``: AutoEP enabled at ``autoep_size`` = ep with
    DeepSpeed's ``preset_model`` for the model's family (``preset``). The rest of the section is
    DeepSpeed's own; on CPU the CUDA-only extras must stay off."""
    section = ds.get("expert_parallel")
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{source}: expert_parallel must be a JSON object, got {json.dumps(section)}")
    section = dict(section or {})
    have = section.get("autoep_size", "auto")
    if have != "auto" and have != dims.ep:
        raise ConfigError(f"{source}: expert_parallel.autoep_size={json.dumps(have)} disagrees with parallel.ep_size="
                          f"{dims.ep}; remove it from the JSON (megakto fills it in) or make them agree")
    if dims.ep == 1:
        if section.get("enabled"):
            raise ConfigError(f"{source}: expert_parallel.enabled=true with parallel.ep_size=1; set parallel.ep_size "
                              "(megakto's expert-parallel mode) instead, or remove the section")
        ds.pop("expert_parallel", None)
        return
    if not on_gpu:
        for key, allowed in _EP_CUDA_ONLY.items():
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if key in section and section[key] not in allowed:
                raise ConfigError(f"{source}: expert_parallel.{key}={json.dumps(section[key])} needs CUDA; remove it "
                                  "on CPU")
    have_preset = section.get("preset_model")
    if have_preset not in (None, "auto", preset):
        raise ConfigError(f"{source}: expert_parallel.preset_model={json.dumps(have_preset)} disagrees with the model's "
                          f"family (preset {preset}); remove it (megakto fills it in)")
    section.update(enabled=True, autoep_size=dims.ep, preset_model=preset)
    ds["expert_parallel"] = section
