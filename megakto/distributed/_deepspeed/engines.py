"""The engines of a KTO run and the groups they reduce over:

* the **policy**: trained with torch AdamW (no JIT-built DeepSpeed optimizer) and a warmup + decay
  schedule stepped by the engine;
* the **reference**: the same weights in a ZeRO-3 *inference* engine (no optimizer), parameters
  offloaded to CPU by default, frozen, in eval mode;
* a ``deepspeed.pipe`` pipeline module over the model's stages, for pipeline parallelism.

Also what is read off a built engine: its ZeRO-3 leaves, the parameters gathered now, and full
copies of its weights.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import deepspeed
import torch

from megakto.distributed import comm
from megakto.distributed._deepspeed.convert import repair_replicated_maps
from megakto.distributed._deepspeed.expert import (allow_string_registry_keys, hf_expert_weights, is_expert_parallel,
                                                   moe_optimizer)
from megakto.model.families import moe_block_classes
from megakto.model.load import outside_zero3
from megakto.model.tp_merge import full_shapes, merge_tp_shards, tied_aliases
from megakto.model.vocab_blocks import merge_vocab_blocks
from megakto.optim import lr_multiplier, param_groups

__all__ = ["disable_dropout", "parallel_groups", "build_pipeline_module", "pipeline_groups", "build_policy_engine",
           "with_moe_leaves", "zero3_leaf_classes", "build_reference_engine", "gathered_numel",
           "gathered_state_dict", "track_gather_buffers", "release_engine"]


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off, so log-probs (and the implicit reward) are deterministic functions of θ."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def parallel_groups(tp: int):
    """``(data-parallel group, tensor-parallel group)`` of the AutoTP mesh that the first engine
    built (``deepspeed.utils.groups``, the groups the engines reduce over); without tensor
    parallelism ``(the world, None)``: every rank is data-parallel and there is no tensor-parallel
    group. Call after an engine exists."""
    if tp == 1:
        return comm.world_group(), None
    from deepspeed.utils import groups

    return groups.get_data_parallel_group(), groups.get_tensor_model_parallel_group()


def build_pipeline_module(specs, *, num_stages: int, partition: str, loss_fn, activation_checkpointing: bool):
    """A ``deepspeed.pipe.PipelineModule`` over ``specs`` (:func:`megakto.model.pipeline_stages.stage_specs`):
    each rank builds only its own stages. ``partition``: ``parameters`` balances the stages' parameter
    counts (taken from the specs, so no rank builds a layer it does not keep), ``uniform`` the number
    of layers, ``type:<regex>`` the layers whose class name matches. ``activation_checkpointing``
    recomputes each decoder stage in the backward (non-reentrant)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

    layers = [TiedLayerSpec(s.tie, s.cls, *s.args, forward_fn=s.forward_fn, tied_weight_attr=["embed_tokens.weight"])
              if s.tie else LayerSpec(s.cls, *s.args) for s in specs]
    counts = [s.params for s in specs]

    class _Pipeline(PipelineModule):
        def _count_layer_params(self):
            return counts

    checkpointing = {"activation_checkpoint_interval": 1, "activation_checkpoint_func": non_reentrant_checkpoint,
                     "checkpointable_layers": ["DecoderStage"]} if activation_checkpointing else {}
    return _Pipeline(layers=layers, num_stages=num_stages, loss_fn=loss_fn, partition_method=partition,
                     dynamic_shape=True, **checkpointing)


def pipeline_groups(engine):
    """``(data-parallel group, pipeline group)`` of a pipeline engine's grid."""
    return engine.grid.get_data_parallel_group(), engine.grid.get_pipe_parallel_group()


def build_policy_engine(model: torch.nn.Module, ds_config: dict, *, lr: float, weight_decay: float,
                        betas: tuple[float, float], eps: float, warmup_steps: int, max_steps: int,
                        schedule: str, min_lr_ratio: float, mpu=None):
    """``mpu``: DeepSpeed's parallel state when it is not DeepSpeed's own (Ulysses sequence groups,
    :func:`megakto.distributed._deepspeed.ulysses.register_ulysses`)."""
    # fused: one kernel per step and no full-size temporaries (ZeRO hands the optimizer one flat
    # fp32 partition per group, so foreach temporaries would be as large as the whole model).
    adamw = partial(torch.optim.AdamW, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    multiplier = partial(lr_multiplier, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule,
                         min_lr_ratio=min_lr_ratio)
    if is_expert_parallel(ds_config):
        # AutoEP replaces the MoE blocks inside initialize: the optimizer and its schedule are built there.
        allow_string_registry_keys()
        optimizer = moe_optimizer(model, lambda m: param_groups(m, weight_decay), adamw)
        scheduler = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=multiplier)
    else:
        optimizer = adamw(param_groups(model, weight_decay))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=with_moe_leaves(model, ds_config), mpu=mpu)
    _mark_universal_info(engine)
    return engine


def with_moe_leaves(model: torch.nn.Module, ds_config: dict) -> dict:
    """``ds_config`` with ``model``'s mixture-of-experts block classes added to ZeRO-3's leaf modules
    (:func:`megakto.model.families.moe_block_classes`). ZeRO-3 prefetches parameters in the order
    modules ran in the last forward; routing changes which experts run, so a leaf MoE block gathers
    all of its experts on entry instead. DeepSpeed's default list names Mixtral and Qwen2/3-MoE only;
    other families (Qwen3.5-MoE, Qwen3-Next, OLMoE, ...) are added here from the model's own class."""
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES

    zero = dict(ds_config.get("zero_optimization") or {})
    classes = [f"{c.__module__}.{c.__qualname__}" for c in moe_block_classes(model)]
    if zero.get("stage") != 3 or not classes:
        return ds_config
    leaf = dict(zero.get("leaf_module") or {})
    known = list(leaf.get("classes", DEFAULT_LEAF_MODULE_CLASSES))
    leaf["classes"] = known + [c for c in classes if c not in known]
    return {**ds_config, "zero_optimization": {**zero, "leaf_module": leaf}}


def zero3_leaf_classes(module: torch.nn.Module) -> list[str]:
    """Class names of the modules DeepSpeed made ZeRO-3 leaves in ``module`` (for the start-up log)."""
    from deepspeed.utils.z3_leaf_module import z3_leaf_module

    return sorted({type(m).__name__ for m in module.modules() if z3_leaf_module(m)})


def _mark_universal_info(policy) -> None:
    """Give every checkpoint what ``ds_to_universal`` needs, so no ``--inject_missing_state`` is ever
    wanted: for ZeRO-1/2 it requires ``UNIVERSAL_CHECKPOINT_INFO`` in the model states, which the
    engine saves from this module attribute (DeepSpeed reserves the key in ``client_state``). AutoTP
    sets its own richer one (its layers' split patterns) during ``deepspeed.initialize``: kept."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    info = getattr(policy.module, UNIVERSAL_CHECKPOINT_INFO, None)
    if info is None:
        setattr(policy.module, UNIVERSAL_CHECKPOINT_INFO,
                {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    else:
        _fix_replicated_maps(policy.module, info)


def _fix_replicated_maps(module: torch.nn.Module, info: dict) -> None:
    """AutoTP's universal info (deepspeed 0.19.8, ``collect_autotp_universal_checkpoint_info``) maps
    each parameter it left whole (norms, a replicated embedding) as one piece every tensor-parallel
    rank holds, of ``param.shape``: under ZeRO-3 (megakto builds the policy under ``zero.Init``) that
    is the empty placeholder, so the map says 0 elements and ``ds_to_universal`` stops ("Rank 0
    supplied a shard of 64 elements, but the map describes 0"). Rebuilt here from the whole shape."""
    repair_replicated_maps(info, {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()})


def build_reference_engine(model: torch.nn.Module, ds_config: dict):
    """The frozen reference: an engine without optimizer, in eval mode, no parameter requiring grad.

    The parameters are frozen *after* ``deepspeed.initialize``: under AutoTP, DeepSpeed registers a
    tensor-parallel gradient all-reduce hook on every replicated parameter its plan marks
    ``replicated_with_grad_allreduce`` (Qwen3's q/k norms), and registering a hook on a tensor that
    does not require grad raises. The hooks of a frozen model never fire: it runs under no_grad.
    """
    model.eval()
    if is_expert_parallel(ds_config):
        allow_string_registry_keys()
    engine, _, _, _ = deepspeed.initialize(model=model, config=with_moe_leaves(model, ds_config))
    engine.module.requires_grad_(False)
    engine.eval()
    return engine


def release_engine(engine) -> None:
    """Let a frozen engine built for a while (the cache precompute's reference) be freed once the
    caller drops it. DeepSpeed 0.19.8 pushes the root module of every ZeRO-3 engine onto a module-level
    stack it never pops (``FWD_MODULE_STACK``, ``runtime/zero/parameter_offload.py`` 20, 315): the
    module, its engine and its weight partition stay alive for the whole process (measured: the
    reference's 128 MiB partition of a 67M-parameter fp32 model on each of 2 ranks through a cached
    run's training), and a memo of its coordinator holds it too (:func:`_clear_params_to_release_cache`).
    This removes the module from both and the engine's hooks (``engine.destroy``); the caller's last
    reference then frees it."""
    from deepspeed.runtime.zero import parameter_offload

    module = getattr(engine, "module", None)
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    engine.destroy()
    _clear_params_to_release_cache()


def _clear_params_to_release_cache() -> None:
    """DeepSpeed 0.19.8's coordinator memoises which parameters each submodule releases in one
    ``functools.lru_cache`` of the class (``partitioned_param_coordinator.py`` 632-634, under an nvtx
    wrapper), keyed by the coordinator and the submodule: it holds every ZeRO-3 model ever traced.
    Cleared whole: the engines still alive recompute their entries on their next forward."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    fn = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(fn, "__closure__", None) or ():
        clear = getattr(cell.cell_contents, "cache_clear", None)
        if clear is not None:
            clear()
    if hasattr(fn, "cache_clear"):  # a DeepSpeed without the nvtx wrapper
        fn.cache_clear()


def gathered_numel(module: torch.nn.Module) -> int:
    """Elements of ``module``'s ZeRO-3 parameters gathered (AVAILABLE) on this rank now: what the
    memory planner's gather terms predict (tools/probe_zero3_gathers.py)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in module.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE)


def track_gather_buffers() -> Callable[[], list[int]]:
    """From now on, follow DeepSpeed's coalesced ZeRO-3 all-gathers (one flat buffer each,
    ``AllGatherCoalescedHandle``, runtime/zero/partition_parameters.py); returns a function giving the
    sizes in bytes of the flat buffers alive at the call, largest first
    (tools/probe_reference_gathers.py)."""
    from weakref import WeakSet

    from deepspeed.runtime.zero import partition_parameters

    handles, init = WeakSet(), partition_parameters.AllGatherCoalescedHandle.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        handles.add(self)
    partition_parameters.AllGatherCoalescedHandle.__init__ = tracked

    def alive() -> list[int]:
        stores = {h.partitions[0].untyped_storage().data_ptr(): h.partitions[0].untyped_storage().nbytes()
                  for h in list(handles) if h.partitions}
        return sorted(stores.values(), reverse=True)
    return alive


def gathered_state_dict(module: torch.nn.Module, *, tp_group: comm.ProcessGroup) -> dict[str, torch.Tensor]:
    """Full-size CPU copies of every parameter under its Hugging Face name, gathered from ZeRO-3
    partitions if need be, from the expert-parallel ranks under AutoEP, and from the ranks of
    ``tp_group`` (AutoTP shards; None: the module holds whole weights, no tensor parallelism).
    Collective: every rank of the engine must call it."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        local = merge_vocab_blocks({name: p.detach().to("cpu", copy=True) for name, p in params.items()})
    if tp_group is None or comm.group_size(group=tp_group) == 1:
        return hf_expert_weights(module, local)  # AutoEP's experts gathered and renamed back
    with outside_zero3():
        shapes, aliases = full_shapes(module.config), tied_aliases(module.config)
    return merge_tp_shards(comm.all_gather_object(local, group=tp_group), shapes, aliases=aliases)
