"""Offline conversions of a ZeRO checkpoint with DeepSpeed's own tools: to the universal form
(``ds_to_universal``) and to consolidated fp32 weights (``zero_to_fp32``), one state dict per
tensor-parallel rank. Both unpickle with ``weights_only=False``, so every file is scanned first
(:func:`~megakto.distributed._deepspeed.checkpoint_io.check_deepspeed_pickles`)."""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection
from unittest import mock

import torch

from megakto.distributed._deepspeed.checkpoint_io import check_deepspeed_pickles, first_line, weights_only_load
from megakto.errors import ModelError
from megakto.model.vocab_blocks import merge_vocab_blocks

__all__ = ["UNIVERSAL_STAGES", "to_universal", "repair_replicated_maps", "any_stage", "frozen_params", "frozen_mismatch",
           "zero_fp32_state_dict", "zero_fp32_shards"]

_ZERO3_STATES, _ZERO_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"

# ds_to_universal's own stages that a conversion killed midway need not redo: the extraction of every
# rank's ZeRO fragments (reading each optimizer file: the long one) and their merge into whole tensors.
# Its functions of each stage (ZeRO-1/2 and ZeRO-3 alike) and the stage they belong to.
UNIVERSAL_STAGES = ("extract", "merge")
_STAGE_FUNCTIONS = {"_extract_zero_shard_files": "extract", "_extract_zero_shard_files_stage3": "extract",
                    "_merge_tp_slice_files": "merge", "_merge_zero3_slice_files": "merge"}


def to_universal(tag_dir: str, out_dir: str, *, workers: int = 1, shapes: dict | None = None,
                 done: Collection[str] = (), finished: Callable[[str], None] | None = None) -> None:
    """DeepSpeed's own ``ds_to_universal`` of the ZeRO checkpoint ``tag_dir`` into ``out_dir``: one
    fp32 file per parameter (weights, Adam moments) that any data-parallel size loads. ``workers``:
    its extraction processes (1: none forked, as inside a training rank). ``shapes``: the
    parameter shapes the trainer state recorded, to repair the replicated maps of a tensor-parallel
    checkpoint saved before megakto fixed them (:func:`repair_replicated_maps`). Offline; it
    unpickles with ``weights_only=False``, so every file is scanned first. Its progress output is
    kept back; a failure is one ModelError line naming ``tag_dir``.

    Staged (:data:`UNIVERSAL_STAGES`): ``finished(stage)`` is called once a stage's files are all
    written, and a stage in ``done`` (finished by an earlier call into the same ``out_dir``) is not
    run again; its fragments stay in ``out_dir/tmp`` until the whole conversion has finished."""
    from deepspeed.checkpoint import ds_to_universal

    check_deepspeed_pickles(tag_dir)
    temp = os.path.join(out_dir, "tmp")  # ds_to_universal's folder of extracted fragments

    def staged(name: str, stage: str):
        run = getattr(ds_to_universal, name)

        def step(*args, **kwargs):
            if stage in done:
                return None
            if stage == "extract":  # fragments of a killed extraction: start it over
                shutil.rmtree(temp, ignore_errors=True)
            result = run(*args, **kwargs)
            if finished is not None:
                finished(stage)
            return result
        return step

    noise = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(_repaired(tag_dir, shapes or {}, os.path.dirname(os.path.abspath(out_dir))))
            args = argparse.Namespace(input_folder=source, output_folder=out_dir, num_extract_workers=workers,
                                      num_merge_workers=max(1, workers // 2), keep_temp_folder=True, strict=True,
                                      inject_missing_state=False)
            for name, stage in _STAGE_FUNCTIONS.items():
                stack.enter_context(mock.patch.object(ds_to_universal, name, staged(name, stage)))
            stack.enter_context(contextlib.redirect_stdout(noise))
            stack.enter_context(contextlib.redirect_stderr(noise))
            ds_to_universal.main(args)
    except Exception as err:  # DeepSpeed's asserts and RuntimeErrors: one line naming the checkpoint
        raise ModelError(f"{tag_dir}: DeepSpeed's universal conversion failed: {first_line(err)}") from None
    shutil.rmtree(temp, ignore_errors=True)


def frozen_params(tag_dir: str) -> dict[str, torch.Tensor]:
    """The parameters no optimizer owns (a LoRA policy's frozen base), whole, under the engine's
    names, from the model-state files of a ZeRO checkpoint without tensor parallelism (DeepSpeed
    saves each rank's fragment of them there; ``ds_to_universal`` does not carry them). In the dtype
    the module held them in; empty when every parameter trains. Expert files are not read."""
    from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES

    # ZeRO-3: zero_pp_rank_<dp>_mp_rank_00_model_states.pt, a flat fragment each; ZeRO-1/2: one file, whole.
    ranked = glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_00_model_states.pt"))
    files = sorted(ranked, key=lambda f: int(os.path.basename(f).split("_")[3])) or \
        glob.glob(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    check_deepspeed_pickles(tag_dir, [os.path.basename(f) for f in files])
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    shapes = (states[0].get(FROZEN_PARAM_SHAPES) or {}) if states else {}
    params = {}
    for name, shape in shapes.items():
        fragments = [state[FROZEN_PARAM_FRAGMENTS][name] for state in states]
        if ranked:
            params[name] = torch.cat([f.reshape(-1) for f in fragments]).narrow(0, 0, shape.numel()).view(shape)
        else:
            params[name] = fragments[0]
        params[name] = params[name].clone()
    return params


def frozen_mismatch(module: torch.nn.Module, path: str) -> str | None:
    """The first frozen parameter of ``module`` (an engine's, after its load) whose values on this
    rank (its ZeRO-3 partition, else the whole tensor) differ from the whole one in ``path``
    (:func:`frozen_params`, saved), or None. Each rank reads only its slices (memory-mapped)."""
    import deepspeed.comm as dist

    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for name, param in module.named_parameters():
        if param.requires_grad:
            continue
        if name not in saved:
            return name
        whole = saved[name].reshape(-1)
        if hasattr(param, "ds_tensor"):
            mine = param.ds_tensor.detach().cpu().reshape(-1)
            start = mine.numel() * dist.get_rank(group=param.ds_process_group)
            want = whole[start:start + mine.numel()]
            mine = mine[:want.numel()]  # the last partition's padding
        else:
            mine, want = param.detach().cpu().reshape(-1), whole
        if not torch.equal(mine, want.to(mine.dtype)):
            return name
    return None


def repair_replicated_maps(info: dict, shapes: dict) -> bool:
    """Give each parameter AutoTP left whole (``TP_REPLICATED_PARAMETER_PATTERNS``) in the universal
    info ``info`` a replicated map of its whole shape from ``shapes`` (name -> shape) where the
    recorded one differs (deepspeed 0.19.8 records ZeRO-3's empty placeholder); returns whether any
    changed."""
    from deepspeed.checkpoint.affine import replicated_map
    from deepspeed.checkpoint.constants import AFFINE_MAP, AFFINE_MAP_PARAMS, TP_REPLICATED_PARAMETER_PATTERNS

    maps = (info.get(AFFINE_MAP) or {}).get(AFFINE_MAP_PARAMS) or {}
    replicated = set(info.get(TP_REPLICATED_PARAMETER_PATTERNS, ()))
    changed = False
    for name, shape in shapes.items():
        pattern = rf"^{re.escape(name)}$"
        saved = maps.get(pattern)
        if pattern in replicated and saved is not None and list(saved["logical_shape"]) != list(shape):
            maps[pattern] = replicated_map(tuple(shape), len(saved["ranks"])).to_dict()
            changed = True
    return changed


@contextlib.contextmanager
def _repaired(tag_dir: str, shapes: dict, scratch: str):
    """``tag_dir``, or a folder beside ``scratch``'s contents that shows it with its model-states
    files' replicated maps repaired (:func:`repair_replicated_maps`; links to every other file): a
    checkpoint is never changed in place (its manifest holds every file's checksum)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    repaired = {}
    for path in glob.glob(os.path.join(tag_dir, "*_model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)  # scanned by check_deepspeed_pickles
        if isinstance(state.get(UNIVERSAL_CHECKPOINT_INFO), dict) and repair_replicated_maps(
                state[UNIVERSAL_CHECKPOINT_INFO], shapes):
            repaired[os.path.basename(path)] = state
    if not repaired:
        yield tag_dir
        return
    with tempfile.TemporaryDirectory(prefix=".tmp-repaired-", dir=scratch) as tmp:
        view = os.path.join(tmp, os.path.basename(os.path.normpath(tag_dir)))
        os.makedirs(view)
        for name in os.listdir(tag_dir):
            if name in repaired:
                torch.save(repaired[name], os.path.join(view, name))
            else:
                os.symlink(os.path.join(os.path.abspath(tag_dir), name), os.path.join(view, name))
        yield view


def any_stage(universal_dir: str) -> None:
    """Make the universal folder ``universal_dir`` (no tensor parallelism) loadable by a ZeRO-1/2
    engine (pipelines included) and a ZeRO-3 one alike: deepspeed 0.19.8's universal loaders of the
    two expect different folders, so each gets what it reads. ZeRO-1/2 reads Adam's step from each
    parameter's ``step.pt``, its global state (``ds_version``, ``param_groups``) from
    ``zero/optimizer_state.pt`` and the engine states (LR schedule, step counters) from
    ``mp_rank_XX_model_states.pt``; ZeRO-3 reads the step from ``optimizer_state.pt``'s
    ``optimizer_state_dict`` and the engine states from ``zero_pp_rank_0_mp_rank_XX_model_states.pt``.
    ZeRO-3's flat weights and moments are stored whole (``{"param": tensor}``, ZeRO-1/2's form),
    which ZeRO-3's loader takes too."""
    from deepspeed.git_version_info import version
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # One file per saved pipeline stage (each records how many there are), under either name.
    for have, want in ((_ZERO3_STATES, _ZERO_STATES), (_ZERO_STATES, _ZERO3_STATES)):
        if glob.glob(os.path.join(universal_dir, want.replace("00", "*"))):
            continue
        for path in glob.glob(os.path.join(universal_dir, have.replace("00", "*"))):
            rank = os.path.basename(path).split("mp_rank_")[1][:2]
            shutil.copy2(path, os.path.join(universal_dir, want.replace("00", rank)))
    zero = os.path.join(universal_dir, "zero")
    path = os.path.join(zero, "optimizer_state.pt")
    optim = weights_only_load(path, map_location="cpu", extra_globals=(LossScaler, ZeroStageEnum))
    names = sorted(n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n)))
    steps = [os.path.join(zero, n, "step.pt") for n in names if os.path.isfile(os.path.join(zero, n, "step.pt"))]
    inner = optim.get("optimizer_state_dict") or {}
    step = (weights_only_load(steps[0], map_location="cpu") if steps
            else next(iter((inner.get("state") or {}).values()))["step"])
    shapes = {}  # ZeRO-3's whole parameter shapes, one dict per parameter group
    for states in glob.glob(os.path.join(universal_dir, _ZERO3_STATES.replace("00", "*"))):
        groups = weights_only_load(states, map_location="cpu", extra_globals=(LossScaler,)).get("param_shapes")
        for group in groups or []:
            shapes.update(group)
    for name in names:
        if not os.path.isfile(os.path.join(zero, name, "step.pt")):
            torch.save(step.clone(), os.path.join(zero, name, "step.pt"))
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            file = os.path.join(zero, name, f"{key}.pt")
            tensor = weights_only_load(file, map_location="cpu") if name in shapes and os.path.isfile(file) else None
            if torch.is_tensor(tensor):  # ZeRO-3's flat tensor: whole, as ZeRO-1/2 reads it
                torch.save({"param": tensor.view(shapes[name]).contiguous()}, file)
    if "optimizer_state_dict" not in optim:
        optim["optimizer_state_dict"] = {"state": {0: {"step": step.clone()}}, "param_groups": optim["param_groups"]}
    optim.setdefault("ds_version", version)
    torch.save(optim, path)


def zero_fp32_state_dict(load_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of a ZeRO checkpoint (DeepSpeed's zero_to_fp32), on CPU, under
    the Hugging Face parameter names.
    Offline: no process group; memory for one full fp32 copy of the model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_deepspeed_pickles(os.path.join(load_dir, tag))
    # Hugging Face names: vocabulary blocks (model.vocab_block_rows) are joined back.
    return merge_vocab_blocks(get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag))


def _mp_ranks(tag_dir: str) -> list[int]:
    found = set()
    for path in glob.glob(os.path.join(tag_dir, "*mp_rank_*_model_states.pt")):
        found.add(int(os.path.basename(path).split("mp_rank_")[1][:2]))
    return sorted(found)


def zero_fp32_shards(load_dir: str, tag: str) -> list[dict[str, torch.Tensor]]:
    """The consolidated fp32 weights of a ZeRO checkpoint, one state dict per tensor-parallel rank
    (``mp_rank_XX`` files), in rank order: one dict without tensor parallelism. zero_to_fp32 reads
    only ``mp_rank_00`` files, so each TP rank's files are shown to it, renamed, in a folder of
    links; its ZeRO partitions are then joined over the data-parallel ranks as usual.
    Offline, as :func:`zero_fp32_state_dict`; memory for one full fp32 copy per TP rank."""
    import tempfile

    tag_dir = os.path.join(load_dir, tag)
    ranks = _mp_ranks(tag_dir)
    if len(ranks) <= 1:
        return [zero_fp32_state_dict(load_dir, tag)]
    if ranks != list(range(len(ranks))):
        raise ModelError(f"{tag_dir}: tensor-parallel ranks {ranks} in its file names are not 0..{len(ranks) - 1}")
    shards = []
    for m in ranks:
        with tempfile.TemporaryDirectory(prefix="megakto-tp-") as tmp:
            view = os.path.join(tmp, tag)
            os.makedirs(view)
            mine = f"mp_rank_{m:02d}"
            for name in os.listdir(tag_dir):
                if mine in name:
                    os.symlink(os.path.join(os.path.abspath(tag_dir), name),
                               os.path.join(view, name.replace(mine, "mp_rank_00")))
            shards.append(zero_fp32_state_dict(tmp, tag))
    return shards
