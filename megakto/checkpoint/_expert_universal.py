"""The universal form of an expert-parallel (AutoEP) checkpoint under Hugging Face names, for a run
without expert parallelism (``parallel.ep_size: 1``).

DeepSpeed's ``ds_to_universal`` gathers every AutoEP expert into one whole tensor per parameter
(``zero/model.layers.N.mlp.experts.w1/fp32.pt``: ``[E, I, H]``, for all ``E`` experts), but under
AutoEP's names, which only an AutoEP engine loads. :func:`rename_to_hf` rewrites ``zero/`` in place
to the names and layouts of the Hugging Face model (:func:`megakto.model.expert_names.autoep_to_hf`):
for the weights (``fp32``) and each of Adam's moments (``exp_avg``, ``exp_avg_sq``) alike, since the
maps are elementwise. ZeRO-1/2's per-parameter ``step.pt`` is copied to the new folders; ZeRO-3 keeps
its step in ``optimizer_state.pt``. Every tensor is written whole (``{"param": tensor}``), which
DeepSpeed's ZeRO-1/2 and ZeRO-3 universal loaders both take; ZeRO-3's flat files are shaped first by
the parameter shapes in the trainer state.
"""

from __future__ import annotations

import os
import shutil

import torch

from megakto.distributed import engine
from megakto.errors import ModelError
from megakto.model.expert_names import autoep_to_hf, is_autoep

__all__ = ["STATE_KEYS", "load_param", "rename_to_hf"]

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # one file each per parameter: weights, Adam's moments
_STEP = "step.pt"


def load_param(path: str, name: str, shapes: dict) -> torch.Tensor:
    """One universal state file as a tensor in its parameter's shape: ZeRO-1/2 (and AutoEP experts)
    store ``{"param": tensor, ...}`` in shape, ZeRO-3 a flat tensor (shaped by ``shapes[name]``)."""
    loaded = engine.weights_only_load(path, map_location="cpu")
    if isinstance(loaded, dict):
        return loaded["param"]
    if name not in shapes:  # a checkpoint saved before param_shapes were recorded: a matrix would come back flat
        raise ModelError(f"{path}: a flat ZeRO-3 tensor and no shape for {name} in the trainer state")
    return loaded.view(shapes[name])


def rename_to_hf(universal_dir: str, shapes: dict) -> None:
    """Rewrite ``universal_dir/zero`` from AutoEP's names to the Hugging Face ones (see the module);
    ``shapes``: the trainer state's ``param_shapes``. A folder without AutoEP names is left alone."""
    zero = os.path.join(universal_dir, "zero")
    names = sorted(n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n)))
    if not is_autoep(names):
        return
    moe = [n for n in names if ".mlp." in n and n.split(".mlp.", 1)[0] + ".mlp.experts.w1" in names]
    renamed: dict[str, dict[str, torch.Tensor]] = {}
    for key in STATE_KEYS:
        # (the router's alias mlp.gate.gate has its weights alone: the optimizer holds the router once)
        state = {n: load_param(os.path.join(zero, n, f"{key}.pt"), n, shapes) for n in moe
                 if os.path.isfile(os.path.join(zero, n, f"{key}.pt"))}
        for name, tensor in autoep_to_hf(state).items():
            renamed.setdefault(name, {})[key] = tensor
    step = next((os.path.join(zero, n, _STEP) for n in moe if os.path.isfile(os.path.join(zero, n, _STEP))), None)
    if step is not None:
        with open(step, "rb") as f:
            step = f.read()
    for name in moe:
        shutil.rmtree(os.path.join(zero, name))
    for name, files in renamed.items():
        os.makedirs(os.path.join(zero, name))
        for key, tensor in files.items():
            torch.save({"param": tensor.contiguous()}, os.path.join(zero, name, f"{key}.pt"))
        if step is not None:
            with open(os.path.join(zero, name, _STEP), "wb") as f:
                f.write(step)
