"""The one module that imports ``deepspeed``.

Builds the two engines of a KTO run from a local Hugging Face folder (or a hub name):

* the **policy**: loaded under ``HfDeepSpeedConfig`` so that with ZeRO-3 ``from_pretrained`` runs
  inside ``zero.Init`` and a large model never materialises whole on one rank; trained with torch
  AdamW (no JIT-built DeepSpeed optimizer) and a warmup + decay schedule stepped by the engine;
* the **reference**: the same weights in a ZeRO-3 *inference* engine (no optimizer), parameters
  offloaded to CPU by default, frozen, in eval mode.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import io
import os
import warnings
from datetime import timedelta
from functools import partial

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from megakto.distributed.ds_config import autotp_size
from megakto.errors import ModelError
from megakto.model.families import moe_block_classes
from megakto.model.load import outside_zero3
from megakto.model.vocab_blocks import BlockedEmbedding, BlockedHead, merge_vocab_blocks, resolve_block_rows
from megakto.optim import lr_multiplier, param_groups

# ZeRO-3 on recent torch calls deprecated collective names on every step; the noise hides real logs.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed.*")

__all__ = [
    "configure_cpu_threads",
    "init_distributed",
    "device",
    "on_gpu",
    "bf16_supported",
    "load_model",
    "block_vocab",
    "split_vocab",
    "build_policy_engine",
    "build_reference_engine",
    "with_moe_leaves",
    "zero3_leaf_classes",
    "gathered_numel",
    "disable_dropout",
    "gathered_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "universal_load_config",
    "to_universal",
    "zero_fp32_state_dict",
    "zero_fp32_shards",
    "parallel_groups",
    "build_pipeline_module",
    "pipeline_groups",
    "check_deepspeed_pickles",
    "unsafe_pickle",
    "weights_only_load",
    "outside_zero3",
    "accelerator_rng_state",
    "set_accelerator_rng_state",
]


def configure_cpu_threads(offloaded: bool = False) -> int | None:
    """Give each local rank its share of the node's cores (returned), unless OMP_NUM_THREADS says
    otherwise (None): on CPU, and on GPU when the optimizer or parameters live in host memory
    (``offloaded``), where every rank runs its CPU AdamW step and host copies at the same moment. The
    deepspeed launcher leaves every rank using all cores, which oversubscribes them (about 4x slower
    on CPU; 8 GPU ranks x all cores for the offloaded optimizer step)."""
    if "OMP_NUM_THREADS" in os.environ or (on_gpu() and not offloaded):
        return None
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, local_ranks))
    torch.set_num_threads(threads)
    return threads


def init_distributed(timeout_minutes: float) -> None:
    """Start the process group (NCCL on GPU, gloo on CPU) with a bounded collective timeout, so
    that if one rank dies the others fail within ``timeout_minutes`` instead of hanging."""
    if on_gpu():
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per local rank
    else:
        # DeepSpeed's CPU shared-memory all-reduce serves only its inference all-reduce, never a
        # training collective (those go through gloo, and inference_all_reduce falls back to it).
        # Building it costs a ~25 s g++ JIT, and each run leaves a 69 MB /dev/shm segment per rank
        # behind, which fills a machine's memory over a test suite. Skip it.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # Passed explicitly: DeepSpeed's own default (10 min, or $DEEPSPEED_TIMEOUT) never applies, and the
    # trainer logs what the backend got (comm.describe).
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes), verbose=False)


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def on_gpu() -> bool:
    return get_accelerator().device_name() != "cpu"


def bf16_supported() -> bool:
    return on_gpu() and get_accelerator().is_bf16_supported()


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off, so log-probs (and the implicit reward) are deterministic functions of θ."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def load_model(path: str, ds_config: dict, *, dtype: torch.dtype, attn_implementation: str,
               trust_remote_code: bool, vocab_block_rows: int | str = 0) -> torch.nn.Module:
    """``from_pretrained`` under the engine's DeepSpeed config (ZeRO-3: partitioned on load), then
    the vocabulary matrices split into row blocks (see :func:`block_vocab`). ``attn_implementation``
    ``auto`` is transformers' own default (sdpa where supported, else eager)."""
    # transformers refuses to load under a config naming tensor_parallel (it would convert the
    # weights for its own TP); AutoTP splits the loaded model later, in deepspeed.initialize.
    hf_view = {key: value for key, value in ds_config.items() if key != "tensor_parallel"}
    dschf = HfDeepSpeedConfig(hf_view)  # noqa: F841 -- must stay alive during from_pretrained
    attn = None if attn_implementation == "auto" else attn_implementation
    with _tp_zero_init(autotp_size(ds_config), hf_view, path, trust_remote_code) as tp_group:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code,
            use_safetensors=None,
        )
    if tp_group is not None:
        _copy_loaded_weights_over_tp(model, tp_group)
    model._megakto_dschf = dschf  # keep the zero3 flag alive for later HF calls (e.g. generation)
    split_vocab(model, vocab_block_rows, ds_config)
    return model


@contextlib.contextmanager
def _tp_zero_init(tp: int, hf_view: dict, path: str, trust_remote_code: bool):
    """Under AutoTP (``tp`` > 1) with ZeRO-3 (``hf_view``: the DeepSpeed config transformers sees):
    partition the loading model over the data-parallel group only; yields the tensor-parallel group
    (None in every other case, where nothing changes).

    transformers' own ``zero.Init`` would partition every parameter over the whole world, and the
    ones AutoTP leaves whole (embedding, norms) would then be split between the ranks of a TP group:
    each ``mp_rank`` file set of a checkpoint would hold part of them, which neither zero_to_fp32
    nor ds_to_universal can read. An enclosing ``zero.Init`` wins over the nested one (DeepSpeed
    patches module construction once, for the outermost context), so this one sets the group. The
    mesh is AutoTP's own (``_init_tp_mesh_device``, which the engine calls again and finds built).
    """
    if tp == 1 or (hf_view.get("zero_optimization") or {}).get("stage", 0) != 3:
        yield None
        return
    from deepspeed.utils import groups
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    # Import the model's code first: zero.Init patches tensor construction, and modules imported
    # under it (torch._dynamo, which transformers' modeling code pulls in) fail their own checks.
    importlib.import_module("torch._dynamo")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        _ = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the lookup imports the modeling module
    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    with deepspeed.zero.Init(data_parallel_group=groups.get_data_parallel_group(), config_dict_or_path=hf_view):
        yield groups.get_tensor_model_parallel_group()


def _copy_loaded_weights_over_tp(model: torch.nn.Module, tp_group) -> None:
    """transformers reads the weights on global rank 0 alone and lets ZeRO-3 spread them over each
    parameter's group; partitioned over data-parallel groups, only rank 0's group got them. Each
    parameter in turn is gathered whole and sent from the TP group's first rank (rank 0's group)."""
    from megakto.distributed import comm

    src = comm.group_ranks(group=tp_group)[0]
    for param in model.parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            comm.broadcast_tensor(param.data, src=src, group=tp_group)


def split_vocab(model: torch.nn.Module, setting: int | str, ds_config: dict) -> None:
    """``model.vocab_block_rows``: split as set; ``auto`` leaves a model it cannot split (e.g. a
    scaled-embedding subclass) as it is, where a row count is an error for it."""
    if setting == 0 or (setting == "auto" and _unsplittable(model) is not None):
        return
    weight = model.get_input_embeddings().weight
    vocab_size, hidden_size = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3: the full shape
    rows = resolve_block_rows(setting, vocab_size, hidden_size)
    if rows:
        block_vocab(model, rows, ds_config)


def _unsplittable(model: torch.nn.Module) -> str | None:
    """Why :func:`block_vocab` cannot split this model's vocabulary matrices; None if it can."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not torch.nn.Embedding:
        return f"the input embedding is a {type(emb).__name__}, not a plain nn.Embedding"
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        return "the input embedding uses max_norm, scale_grad_by_freq or sparse gradients"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"the output head is a {type(head).__name__}, not a bias-free nn.Linear"
    return None


def block_vocab(model: torch.nn.Module, rows: int, ds_config: dict) -> None:
    """Replace the input embedding and the output head with their ``rows``-row blocks
    (:mod:`megakto.model.vocab_blocks`), keeping a tie. Under ZeRO-3 each matrix in turn is
    gathered once (a one-off full copy per rank) and cut into blocks, each partitioned at once."""
    why = _unsplittable(model)
    if why:
        raise ModelError(f"model.vocab_block_rows={rows}: {why}; set model.vocab_block_rows=0 (or auto)")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    place = None
    if hasattr(emb.weight, "ds_id"):  # ZeRO-3: partition each block as from_pretrained did the rest
        place = lambda block: deepspeed.zero.Init(module=block, config_dict_or_path=ds_config)  # noqa: E731
    # One matrix gathered at a time, each block partitioned as soon as it is cut.
    with deepspeed.zero.GatheredParameters([emb.weight], modifier_rank=None):
        new_emb = BlockedEmbedding.from_weight(emb.weight, rows, emb.padding_idx, place=place)
    if tied:
        new_head = BlockedHead.tied_to(new_emb)
    else:
        with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
            new_head = BlockedHead.from_weight(head.weight, rows, place=place)
    model.set_input_embeddings(new_emb)
    model.set_output_embeddings(new_head)


def parallel_groups(tp: int):
    """``(data-parallel group, tensor-parallel group)`` of the AutoTP mesh that the first engine
    built (``deepspeed.utils.groups``, the groups the engines reduce over); ``(None, None)`` without
    tensor parallelism, where the data-parallel group is the world. Call after an engine exists."""
    if tp == 1:
        return None, None
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
                        schedule: str, min_lr_ratio: float):
    # fused: one kernel per step and no full-size temporaries (ZeRO hands the optimizer one flat
    # fp32 partition per group, so foreach temporaries would be as large as the whole model).
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        partial(lr_multiplier, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule,
                min_lr_ratio=min_lr_ratio),
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=with_moe_leaves(model, ds_config))
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

    if getattr(policy.module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
        setattr(policy.module, UNIVERSAL_CHECKPOINT_INFO,
                {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def build_reference_engine(model: torch.nn.Module, ds_config: dict):
    """The frozen reference: an engine without optimizer, in eval mode, no parameter requiring grad.

    The parameters are frozen *after* ``deepspeed.initialize``: under AutoTP, DeepSpeed registers a
    tensor-parallel gradient all-reduce hook on every replicated parameter its plan marks
    ``replicated_with_grad_allreduce`` (Qwen3's q/k norms), and registering a hook on a tensor that
    does not require grad raises. The hooks of a frozen model never fire: it runs under no_grad.
    """
    model.eval()
    engine, _, _, _ = deepspeed.initialize(model=model, config=with_moe_leaves(model, ds_config))
    engine.module.requires_grad_(False)
    engine.eval()
    return engine


def gathered_numel(module: torch.nn.Module) -> int:
    """Elements of ``module``'s ZeRO-3 parameters gathered (AVAILABLE) on this rank now: what the
    memory planner's gather terms predict (tools/probe_zero3_gathers.py)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in module.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE)


def gathered_state_dict(module: torch.nn.Module, tp_group=None) -> dict[str, torch.Tensor]:
    """Full-size CPU copies of every parameter under its Hugging Face name, gathered from ZeRO-3
    partitions if need be, and from the ranks of ``tp_group`` (AutoTP shards) when given.
    Collective: every rank of the engine must call it."""
    from megakto.distributed import comm
    from megakto.model.tp_merge import full_shapes, merge_tp_shards, tied_aliases

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        local = merge_vocab_blocks({name: p.detach().to("cpu", copy=True) for name, p in params.items()})
    if tp_group is None or comm.group_size(group=tp_group) == 1:
        return local
    with outside_zero3():
        shapes, aliases = full_shapes(module.config), tied_aliases(module.config)
    return merge_tp_shards(comm.all_gather_object(local, group=tp_group), shapes, aliases=aliases)


# ---------------------------------------------------------------------------------------------
# Checkpoints: DeepSpeed's own files; the protocol around them lives in megakto/checkpoint.py.


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
        return f"not a readable torch checkpoint file ({_first_line(err)})"
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def weights_only_load(path: str, map_location=None, extra_globals=()):
    """``torch.load(weights_only=True)`` allowing ``extra_globals``; a damaged file or a refused
    pickle is one ModelError line naming the file instead of torch's multi-line error."""
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # PytorchStreamReader (damaged zip), UnpicklingError (refused global), ...
        why = unsafe_pickle(path) or f"cannot load it: {_first_line(err)}"
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
    # ZeRO-3's universal load copies param group 0's hyperparameters into every group; megakto's
    # groups differ in weight_decay (none on norms and biases), so each group gets its own back.
    decay = [group.get("weight_decay") for group in policy.optimizer.param_groups]
    try:
        path, _ = policy.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        del ckpt_engine.load
    if policy.load_universal_checkpoint():
        for group, value in zip(policy.optimizer.param_groups, decay):
            group["weight_decay"] = value
        # ZeRO-3's universal load (deepspeed 0.19.8) gives every sub-group's Adam state one and the
        # same ``step`` tensor, which torch's AdamW then increments in place once per sub-group per
        # step: the bias correction runs ahead (measured: KL off by 1e-2 two steps after a resume).
        for state in getattr(policy.optimizer, "optimizer", policy.optimizer).state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    if path is None:
        raise ModelError(f"{os.path.join(load_dir, tag)}: DeepSpeed found no checkpoint there")


def universal_load_config(ds_config: dict) -> dict:
    """``ds_config`` for a policy engine that loads a universal checkpoint (``checkpoint.load_universal``)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def to_universal(tag_dir: str, out_dir: str, *, workers: int = 1) -> None:
    """DeepSpeed's own ``ds_to_universal`` of the ZeRO checkpoint ``tag_dir`` into ``out_dir``: one
    fp32 file per parameter (weights, Adam moments) that any data-parallel size loads. ``workers``:
    its extraction processes (1: none forked, as inside a training rank). Offline; it unpickles
    with ``weights_only=False``, so every file is scanned first. Its progress output is kept back;
    a failure is one ModelError line naming ``tag_dir``."""
    from deepspeed.checkpoint import ds_to_universal

    check_deepspeed_pickles(tag_dir)
    args = argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    noise = io.StringIO()
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            ds_to_universal.main(args)
    except Exception as err:  # DeepSpeed's asserts and RuntimeErrors: one line naming the checkpoint
        raise ModelError(f"{tag_dir}: DeepSpeed's universal conversion failed: {_first_line(err)}") from None


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


def accelerator_rng_state() -> torch.Tensor | None:
    """The accelerator's generator state; None on CPU, where it is torch's CPU generator."""
    return get_accelerator().get_rng_state() if on_gpu() else None


def set_accelerator_rng_state(state: torch.Tensor | None) -> None:
    if state is not None and on_gpu():
        get_accelerator().set_rng_state(state)
