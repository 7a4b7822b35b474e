"""DeepSpeed's own checkpoint files of the policy engine: save, load, and the pickle allow-list
that every read of them goes through. The protocol around them (manifest, commit, resume) lives in
:mod:`megakto.checkpoint`."""

from __future__ import annotations

import copy
import glob
import os

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from megakto.errors import ModelError

__all__ = ["save_checkpoint", "load_checkpoint", "universal_load_config", "unsafe_pickle",
           "check_deepspeed_pickles", "weights_only_load", "first_line"]


def save_checkpoint(policy, save_dir: str, tag: str, on_write=None) -> None:
    """DeepSpeed's checkpoint of the policy engine under ``save_dir/tag``: module, ZeRO partitions,
    optimizer and the client LR scheduler the engine was given. Collective. DeepSpeed's own
    ``latest`` file is not written: megakto.checkpoint moves it only once the tag is complete.
    ``on_write(path)`` is called for every file this rank writes, right after it is written (the
    checkpoint engine's ``save`` is wrapped for this call, as ``load`` is in :func:`load_checkpoint`)."""
    ckpt_engine = policy.checkpoint_engine
    if on_write is not None:
        original = ckpt_engine.save

        def save(state_dict, path):
            original(state_dict, path)
            on_write(path)

        ckpt_engine.save = save  # instance attribute: shadows the method for this call
    try:
        policy.save_checkpoint(save_dir, tag=tag, client_state={}, save_latest=False)
    finally:
        if on_write is not None:
            del ckpt_engine.save


# Besides tensors and plain containers, these are the globals that DeepSpeed ZeRO checkpoints
# pickle (found with torch.serialization.get_unsafe_globals_in_checkpoint on our own 2-rank saves
# under ds_configs/zero1.json, zero2.json and zero3.json with DeepSpeed 0.19.8):
#   LossScaler             the fp32/bf16 "loss scaler" (every stage)
#   ZeroStageEnum          the stage, in the optimizer state (every stage)
#   fragment_address       ZeRO-1/2 'param_slice_mappings': where each parameter's slice lies
#                          in the flat fp32 partition (a dataclass of two ints)
# collections.OrderedDict is in torch's weights_only set already.
_DEEPSPEED_PICKLE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


def _allowed_globals() -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in _DEEPSPEED_PICKLE_GLOBALS}


def unsafe_pickle(path: str) -> str | None:
    """Why the torch file at ``path`` must not be unpickled (one phrase), or None: it names no
    global beyond torch's ``weights_only`` set and :data:`_DEEPSPEED_PICKLE_GLOBALS`. Reads the
    pickle opcodes and executes nothing."""
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as err:  # not a zip-format torch file, truncated, damaged ...
        return f"not a readable torch checkpoint file ({first_line(err)})"
    foreign = sorted(names - _allowed_globals())
    if foreign:
        return (f"refusing to unpickle {foreign}: a checkpoint holds tensors, plain types and "
                "DeepSpeed's own classes only")
    return None


def check_deepspeed_pickles(tag_dir: str, names: list[str] | None = None) -> None:
    """Refuse a checkpoint (its ``*.pt`` files, or the ``names`` given) that :func:`unsafe_pickle`
    refuses, with a ModelError naming the file. It guards the loaders that DeepSpeed runs with
    ``weights_only=False`` (zero_to_fp32)."""
    paths = ([os.path.join(tag_dir, n) for n in names] if names is not None
             else sorted(glob.glob(os.path.join(tag_dir, "*.pt"))))
    for path in paths:
        why = unsafe_pickle(path)
        if why is not None:
            raise ModelError(f"{path}: {why}")


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def weights_only_load(path: str, map_location=None, extra_globals=()):
    """``torch.load(weights_only=True)`` allowing ``extra_globals``; a damaged file or a refused
    pickle is one ModelError line naming the file instead of torch's multi-line error."""
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # PytorchStreamReader (damaged zip), UnpicklingError (refused global), ...
        why = unsafe_pickle(path) or f"cannot load it: {first_line(err)}"
        raise ModelError(f"{path}: Weights only load failed: {why}") from None


def _weights_only_load(path: str, map_location=None):
    return weights_only_load(path, map_location, _DEEPSPEED_PICKLE_GLOBALS)


def load_checkpoint(policy, load_dir: str, tag: str) -> None:
    """Restore weights, optimizer and LR schedule from ``load_dir/tag`` into a freshly built
    engine. Collective. DeepSpeed's checkpoint engine reads every file through its ``load``
    method with ``weights_only=False``; for this call that method is swapped for a
    ``weights_only=True`` load that allows DeepSpeed's checkpoint classes and nothing else.
    An engine built with :func:`universal_load_config` reads a universal checkpoint (its
    ``zero/`` files DeepSpeed loads itself, unguarded: megakto.checkpoint.verify scans them first)."""
    ckpt_engine = policy.checkpoint_engine
    ckpt_engine.load = _weights_only_load  # instance attribute: shadows the method for this engine
    scheduler = getattr(policy, "lr_scheduler", None)
    if policy.load_universal_checkpoint() and scheduler is not None:
        scheduler.load_state_dict = _per_group_fitted(scheduler)
    # ZeRO-3's universal load copies param group 0's hyperparameters into every group; megakto's
    # groups differ in weight_decay (none on norms and biases), so each group gets its own back.
    decay = [group.get("weight_decay") for group in policy.optimizer.param_groups]
    try:
        path, _ = policy.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        del ckpt_engine.load
        if scheduler is not None and "load_state_dict" in vars(scheduler):
            del scheduler.load_state_dict
    if policy.load_universal_checkpoint():
        for group, value in zip(policy.optimizer.param_groups, decay):
            group["weight_decay"] = value
        # ZeRO-3's universal load (deepspeed 0.19.8) gives every sub-group's Adam state one and the
        # same ``step`` tensor, which torch's AdamW then increments in place once per sub-group per
        # step: the bias correction runs ahead (measured: KL off by 1e-2 two steps after a resume).
        # Expert parallelism always has two sub-groups (AutoEP's experts are their own param group):
        # tests/checkpoint/test_ep_checkpoint.py resumes it bitwise only with this clone.
        for state in getattr(policy.optimizer, "optimizer", policy.optimizer).state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    if path is None:
        raise ModelError(f"{os.path.join(load_dir, tag)}: DeepSpeed found no checkpoint there")


def _per_group_fitted(scheduler):
    """``scheduler.load_state_dict`` taking a state saved with another number of parameter groups,
    if that state is the same for every group: an expert-parallel run (AutoEP puts the experts in
    groups of their own) resumed without expert parallelism through a universal checkpoint. megakto's
    groups differ in weight decay only, so every group has the same schedule; a state whose groups
    differ is passed on as it is (and refused by torch)."""
    load, groups = scheduler.load_state_dict, len(scheduler.base_lrs)

    def fitted(state):
        lists = {k: v for k in ("base_lrs", "_last_lr", "lr_lambdas") if isinstance(v := state.get(k), list) and v}
        if any(len(v) != groups for v in lists.values()) and all(v.count(v[0]) == len(v) for v in lists.values()):
            state = {**state, **{k: [copy.copy(v[0]) for _ in range(groups)] for k, v in lists.items()}}
        load(state)

    return fitted


def universal_load_config(ds_config: dict) -> dict:
    """``ds_config`` for a policy engine that loads a universal checkpoint (``checkpoint.load_universal``)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
