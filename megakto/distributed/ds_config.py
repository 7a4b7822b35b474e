"""Fill and check DeepSpeed JSON settings from the megakto config.

``ds_configs/*.json`` hold DeepSpeed's own settings only (ZeRO stage, buckets, offload). The
fields that megakto also owns are filled here from :class:`~megakto.config.Config` and
:class:`~megakto.distributed.parallel.ParallelDims`, so the two can never silently disagree: a
value already in the JSON must match, or the run stops with both numbers and the arithmetic.

Two simplifications, on purpose:
- No ``optimizer``/``scheduler`` sections: megakto builds torch AdamW and the LR schedule itself
  (one code path for every ZeRO stage, and the schedule is checkpointed with the trainer).
- No ``"auto"`` values except in the fields filled here: only the Hugging Face Trainer resolves
  ``"auto"``; DeepSpeed itself would fail later with a less useful message. The fields filled here
  include the ZeRO sizes of :data:`ZERO_AUTO_KEYS`, sized for the device (:func:`zero_sizes`).

No ``import deepspeed`` here: these are plain dicts, checked before any process group exists.
"""

import copy
import json
import os
from typing import Any, Optional

from packaging.version import Version

from megakto.config import Config
from megakto.distributed._expert_config import fill_expert_parallel
from megakto.distributed.parallel import ParallelDims
from megakto.errors import ConfigError

__all__ = ["build_ds_config", "reference_ds_config", "load_ds_json", "autotp_size", "check_deepspeed_version",
           "MIN_DEEPSPEED_TP", "check_versions", "MIN_DEEPSPEED", "MIN_TRANSFORMERS", "TORCH_RANGE", "ZERO_AUTO_KEYS", "CPU_ZERO_SIZES", "zero_sizes", "auto_zero_sizes", "host_offload",
           "grad_accum_bytes"]

# AutoTP training under ZeRO-3 needs 0.19.4 (earlier releases refuse it or wrote incomplete
# checkpoints); the vocabulary-parallel output head megakto scores on
# (tensor_parallel.vocab_parallel_lm_head, VocabParallelLinear) is newer still, and 0.19.8 is the
# release the tensor-parallel path is tested with.
MIN_DEEPSPEED_TP = "0.19.8"
MIN_DEEPSPEED_PP = "0.19.3"  # pipeline gradients under gradient accumulation (DeepSpeed PR 8154)
# Every run: before 0.19.2 the engine cast the whole module to bf16 under ZeRO-1/2, the rotary inv_freq
# buffers included (the fp32-buffer-preserving cast is DeepSpeed PR 8066, v0.19.2). setup.py asks for
# 0.19.8, the release the suite runs and the tensor-parallel path needs; this refuses what is known wrong.
MIN_DEEPSPEED = "0.19.2"
# Every run: packed rows stay apart under sdpa/eager only because transformers builds the block mask from
# restarting position_ids (PR 39194, 4.54); from_pretrained(dtype=) is 4.56's spelling (older releases
# ignore it and load fp32); the pipeline stages call the 5.0 masking_utils interface. The suite runs
# 5.25; 5.x releases before it are untested but share those interfaces.
MIN_TRANSFORMERS = "5.0"
# [floor, ceiling): weights_only loading with allow-listed globals needs 2.4; the suite runs 2.13, and
# releases from 2.15 on are untested (setup.py holds the same range).
TORCH_RANGE = ("2.4", "2.15")

# ZeRO sizes (elements) that a JSON may leave to megakto as "auto"; a number in the JSON always wins.
ZERO_AUTO_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "sub_group_size",
                  "stage3_param_persistence_threshold")
# On CPU, device and host memory are one: small buckets and optimizer sub-groups keep the flat buffers
# and the step's temporaries small next to the model.
CPU_ZERO_SIZES = {"reduce_bucket_size": 10_000_000, "stage3_prefetch_bucket_size": 10_000_000,
                  "sub_group_size": 10_000_000, "stage3_param_persistence_threshold": 10_000}


def zero_sizes(on_gpu: bool, hidden_size: int | None) -> dict[str, int]:
    """What ``"auto"`` means for :data:`ZERO_AUTO_KEYS`. On CPU: :data:`CPU_ZERO_SIZES`. On GPU, the
    rule of the Hugging Face integration's ``"auto"`` (transformers.integrations.deepspeed): buckets of
    one hidden x hidden matrix (reduce hidden², prefetch 0.9·hidden²), parameters under 10·hidden
    elements (norms, biases) kept whole; ``sub_group_size`` DeepSpeed's default, 1e9 (the CPU cap
    would split the optimizer step of a 32B partition into hundreds of rounds)."""
    if not on_gpu:
        return dict(CPU_ZERO_SIZES)
    h = int(hidden_size)
    return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "sub_group_size": 1_000_000_000, "stage3_param_persistence_threshold": 10 * h}


def auto_zero_sizes(ds: dict) -> list[str]:
    """The :data:`ZERO_AUTO_KEYS` that ``ds`` leaves as ``"auto"``."""
    zero = ds.get("zero_optimization")
    return [k for k in ZERO_AUTO_KEYS if isinstance(zero, dict) and zero.get(k) == "auto"]


def _fill_zero_sizes(ds: dict, on_gpu: bool, hidden_size: int | None, source: str) -> None:
    auto = auto_zero_sizes(ds)
    if not auto:
        return
    if on_gpu and not hidden_size:
        raise ConfigError(f'{source}: zero_optimization.{auto[0]}="auto" is sized from the model\'s hidden_size '
                          "on GPU, and none is known here; give a number")
    sizes = zero_sizes(on_gpu, hidden_size)
    ds["zero_optimization"] = {**ds["zero_optimization"], **{k: sizes[k] for k in auto}}


def host_offload(ds: dict) -> bool:
    """Whether ``ds`` offloads the optimizer or the parameters to host memory (CPU or NVMe)."""
    zero = ds.get("zero_optimization")
    zero = zero if isinstance(zero, dict) else {}
    return any(isinstance(zero.get(k), dict) and zero[k].get("device", "none") not in ("none", None)
               for k in ("offload_optimizer", "offload_param"))


_FORBIDDEN = {
    "optimizer": "megakto builds torch AdamW from optim.lr, optim.betas, optim.eps and "
    "optim.weight_decay",
    "scheduler": "megakto builds the LR schedule from optim.schedule, optim.warmup_steps and "
    "optim.min_lr_ratio",
}

# Settings a frozen inference engine shares with the policy engine.
_REF_COPIED = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "bf16",
    "fp16",
    "tensor_parallel",
    "sequence_parallel_size",
    "expert_parallel",
    "steps_per_print",
    "wall_clock_breakdown",
)


def load_ds_json(path: str) -> dict:
    """Read a DeepSpeed JSON file; a missing or malformed file is a one-line ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            ds = json.load(fh)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
            ) from None
    if not isinstance(ds, dict):
        raise ConfigError(
            f"{path} must hold a JSON object of DeepSpeed settings, got {type(ds).__name__}"
        )
    return ds


def autotp_size(ds: dict) -> int:
    """``tensor_parallel.autotp_size`` of a DeepSpeed dict (1 when absent)."""
    size = (ds.get("tensor_parallel") or {}).get("autotp_size", 1)
    return 1 if size in (None, "auto") else int(size)


def _fill_tensor_parallel(ds: dict, dims: ParallelDims, source: str) -> int:
    """``tensor_parallel`` from ``parallel.tp_size``: AutoTP's degree, and the output head split
    into vocabulary rows (``vocab_parallel_lm_head``) so that no rank ever holds full logits."""
    section = ds.get("tensor_parallel")
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{source}: tensor_parallel must be a JSON object, got {_show(section)}")
    section = dict(section or {})
    have = autotp_size(ds) if section.get("autotp_size", "auto") != "auto" else None
    if have is not None and have != dims.tp:
        raise ConfigError(
            f"{source}: tensor_parallel.autotp_size={have} disagrees with parallel.tp_size={dims.tp} "
            f"(world {dims.world_size} = dp {dims.dp} × tp {dims.tp} × pp {dims.pp}); remove it from "
            "the JSON (megakto fills it in) or make them agree"
        )
    if dims.tp == 1:
        return 1
    if section.get("vocab_parallel_lm_head", True) is not True:
        raise ConfigError(
            f"{source}: tensor_parallel.vocab_parallel_lm_head={_show(section['vocab_parallel_lm_head'])}: "
            "megakto scores log-probs on each rank's vocabulary rows and needs it true; remove it"
        )
    section.update(autotp_size=dims.tp, vocab_parallel_lm_head=True)
    ds["tensor_parallel"] = section
    return dims.tp


def _fill_sequence_parallel(ds: dict, dims: ParallelDims, stage: Any, source: str) -> None:
    """``sequence_parallel_size``: DeepSpeed divides the world by it to count data-parallel ranks
    (its batch check, ZeRO-3's partitioning at load). megakto runs Ulysses under ZeRO-3 only: the
    stage whose gradient averaging it pins against one process (megakto.runners.sequence)."""
    have = ds.get("sequence_parallel_size")
    if have is not None and have != dims.sp:
        raise ConfigError(f"{source}: sequence_parallel_size={_show(have)} disagrees with parallel.sp_size={dims.sp}; "
                          "remove it from the DeepSpeed JSON (megakto fills it in)")
    if dims.sp == 1:
        ds.pop("sequence_parallel_size", None)
        return
    if stage != 3:
        raise ConfigError(f"{source}: zero_optimization.stage={_show(stage)} with parallel.sp_size={dims.sp}: "
                          "megakto's sequence parallelism runs under ZeRO-3 only; use ds_configs/zero3.json "
                          "(or set zero_optimization.stage=3)")
    ds["sequence_parallel_size"] = dims.sp


def check_deepspeed_version(tp: int, pp: int = 1, installed: str | None = None) -> None:
    """AutoTP training under ZeRO-3 (and complete TP checkpoints) needs deepspeed >= 0.19.4, and
    the vocabulary-parallel head came after it; refuse older releases when ``tp > 1``. Before 0.19.3
    every pipeline stage but the last scaled its gradients by the accumulation steps once more
    (DeepSpeed PR 8154): refuse those when ``pp > 1``."""
    if tp == 1 and pp == 1:
        return
    if installed is None:
        from importlib.metadata import version

        installed = version("deepspeed")
    if pp > 1 and Version(installed) < Version(MIN_DEEPSPEED_PP):
        raise ConfigError(
            f"parallel.pp_size={pp} needs deepspeed >= {MIN_DEEPSPEED_PP} (earlier releases scale the "
            f"gradients of every stage but the last wrongly under gradient accumulation), but {installed} is "
            f"installed; pip install 'deepspeed>={MIN_DEEPSPEED_PP}'"
        )
    if tp > 1 and Version(installed) < Version(MIN_DEEPSPEED_TP):
        raise ConfigError(
            f"parallel.tp_size={tp} needs deepspeed >= {MIN_DEEPSPEED_TP} (AutoTP training with "
            f"ZeRO-3, complete TP checkpoints, a vocabulary-parallel output head), but {installed} is "
            f"installed; pip install 'deepspeed>={MIN_DEEPSPEED_TP}'"
        )


def check_versions(tp: int = 1, pp: int = 1, installed: dict[str, str] | None = None) -> None:
    """Refuse, in one line naming the installed and the required version, a torch, transformers or
    deepspeed that megakto's results depend on being newer (or, torch, not newer than tested); then
    the tensor- and pipeline-parallel floors (:func:`check_deepspeed_version`). ``installed``:
    {package: version} instead of the installed packages' metadata (tests)."""
    from importlib.metadata import version

    def have(name: str) -> str:
        return installed[name] if installed is not None else version(name)

    torch_v, low, high = have("torch"), *TORCH_RANGE
    if not Version(low) <= Version(Version(torch_v).base_version) < Version(high):
        raise ConfigError(f"megakto needs torch >= {low}, < {high} (the range it is tested in), but {torch_v} is "
                          f"installed; pip install 'torch>={low},<{high}'")
    transformers_v = have("transformers")
    if Version(transformers_v) < Version(MIN_TRANSFORMERS):
        raise ConfigError(f"megakto needs transformers >= {MIN_TRANSFORMERS} (packed rows kept apart by masks built "
                          f"from position_ids, models loaded with dtype=), but {transformers_v} is installed; "
                          f"pip install 'transformers>={MIN_TRANSFORMERS}'")
    deepspeed_v = have("deepspeed")
    if Version(deepspeed_v) < Version(MIN_DEEPSPEED):
        raise ConfigError(f"megakto needs deepspeed >= {MIN_DEEPSPEED} (earlier releases cast the rotary inv_freq "
                          f"buffers to bf16 under ZeRO-1/2), but {deepspeed_v} is installed; "
                          f"pip install 'deepspeed>={MIN_DEEPSPEED}'")
    check_deepspeed_version(tp, pp, installed=deepspeed_v)


_ACCUM_DTYPES = {"fp32": 4, "float32": 4, "float": 4, "torch.float32": 4,
                 "bf16": 2, "bfloat16": 2, "torch.bfloat16": 2}  # DeepSpeed's DtypeEnum spellings we allow


def _fill_grad_accum_dtype(ds: dict, bf16: bool, stage: Any, pp: int, source: str) -> None:
    """``data_types.grad_accum_dtype``, the dtype DeepSpeed sums the micro-batches' gradients in
    (its default: the model's). A value in the JSON wins; megakto fills ``"fp32"`` for bf16 under
    ZeRO-3 only, where the sum already lives in one flat buffer of the rank's partition
    (``grad_partitions_flat_buffer``): 2 more bytes per parameter per rank (on the host under
    optimizer offload), and no bf16 rounding of the running sum at every micro-batch. Elsewhere
    DeepSpeed 0.19.8 pays more for it: at ZeRO-1 (pipelines included) it swaps its ZeRO optimizer
    for BF16_Optimizer, whose fp32 gradient is the whole model on every rank (4·P bytes) and whose
    checkpoints are another layout; at ZeRO-2 the fp32 partition sits on the device even under
    optimizer offload, where bf16 accumulation keeps none there; at stage 0 it refuses the mix.
    With the gradient-accumulation steps of the recipes (2-4) the bf16 sum adds at most 1-3
    roundings of u = 2^-8 to a gradient each micro-batch already rounds once."""
    section = ds.get("data_types")
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{source}: data_types must be a JSON object, got {_show(section)}")
    section = dict(section or {})
    have = section.get("grad_accum_dtype", "auto")
    if have in ("auto", None):
        if bf16 and stage == 3:
            section["grad_accum_dtype"] = "fp32"
            ds["data_types"] = section
        elif "grad_accum_dtype" in section:
            del section["grad_accum_dtype"]  # DeepSpeed's default, the model's dtype
            ds["data_types"] = section
        return
    if have not in _ACCUM_DTYPES:
        raise ConfigError(f"{source}: data_types.grad_accum_dtype={_show(have)}: allowed values are fp32 and bf16 "
                          "(or remove it: fp32 under ZeRO-3 in bf16, the model's dtype otherwise)")
    if _ACCUM_DTYPES[have] == 2 and not bf16:
        raise ConfigError(f"{source}: data_types.grad_accum_dtype={_show(have)} with an fp32 model: DeepSpeed sums "
                          "the gradients of fp32 weights in fp32 only; remove it")
    if _ACCUM_DTYPES[have] == 4 and bf16 and stage in (0, None):
        raise ConfigError(f"{source}: data_types.grad_accum_dtype={_show(have)} with bf16 at ZeRO stage 0"
                          f"{' (pipelines, pp=' + str(pp) + ')' if pp > 1 else ''}: DeepSpeed has no fp32 gradient "
                          "sum without a ZeRO optimizer; remove it or use ZeRO stage 1")


def grad_accum_bytes(ds: dict, bf16: bool) -> int:
    """Bytes per element of the gradient sum a filled DeepSpeed dict asks for (the model's dtype
    when it names none)."""
    have = (ds.get("data_types") or {}).get("grad_accum_dtype")
    return _ACCUM_DTYPES.get(have, 2 if bf16 else 4)


def _show(value: Any) -> str:
    return json.dumps(value)


def _agree(ds: dict, key: str, want: Any, explain: str, source: str, name: str = "") -> None:
    """Set ``ds[key] = want`` unless the JSON already holds a different, non-"auto" value."""
    have = ds.get(key, "auto")
    disagrees = isinstance(have, bool) != isinstance(want, bool) or have != want
    if have != "auto" and disagrees:
        raise ConfigError(
            f"{source}: {name or key}={_show(have)} disagrees with {explain}; "
            "remove it from the JSON or make them agree"
        )
    ds[key] = want


def _find_auto(node: Any, path: str = "") -> Optional[str]:
    if node == "auto":
        return path
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    return None


def _bf16_from_dtype(dtype: str) -> bool:
    if dtype == "auto":
        import torch  # Lazy: keeps this module importable without torch for config tooling.

        return torch.cuda.is_available()
    return dtype == "bfloat16"


def build_ds_config(
    ds: dict,
    cfg: Config,
    dims: ParallelDims,
    *,
    bf16: Optional[bool] = None,
    on_gpu: bool = False,
    hidden_size: int | None = None,
    expert_preset: str | None = None,
    source: str = "DeepSpeed config",
) -> dict:
    """Return a copy of ``ds`` with batch sizes, clipping and precision (``bf16``, and the dtype
    gradients are summed in: :func:`_fill_grad_accum_dtype`) filled from ``cfg``/``dims``,
    and the ZeRO sizes left ``"auto"`` sized for the device (:func:`zero_sizes`: ``hidden_size``, the
    model's, is needed on GPU only). ``expert_preset``: DeepSpeed's AutoEP preset for the model
    (filled into ``expert_parallel`` when ``parallel.ep_size`` > 1).

    ``bf16`` is the resolved precision (``model.dtype='auto'`` means bf16 on GPU); ``None`` derives
    it from ``cfg.model.dtype`` here. ``source`` names the JSON file in error messages.
    """
    ds = copy.deepcopy(ds)
    for key, why in _FORBIDDEN.items():
        if key in ds:
            raise ConfigError(f'{source}: remove the "{key}" section; {why}')

    tp = _fill_tensor_parallel(ds, dims, source)
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if dims.pp > 1 and isinstance(stage, int) and stage >= 2:
        raise ConfigError(
            f"{source}: zero_optimization.stage={stage} cannot be combined with pipeline "
            f"parallelism (pp={dims.pp}); DeepSpeed allows only ZeRO stage 0 or 1 with pipelines"
        )
    _fill_sequence_parallel(ds, dims, stage, source)
    fill_expert_parallel(ds, dims, expert_preset, on_gpu, source)

    mb, ga, dp = dims.micro_batch_size, dims.grad_accum, dims.dp
    _agree(ds, "train_micro_batch_size_per_gpu", mb, f"train.micro_batch_size={mb}", source)
    _agree(
        ds, "gradient_accumulation_steps", ga,
        f"train.global_batch_size / (train.micro_batch_size × dp) = "
        f"{dims.global_batch_size} / ({mb} × {dp}) = {ga}",
        source,
    )
    if tp > 1:
        # With AutoTP, DeepSpeed checks train_batch_size == micro × grad-accum × *world* (not dp),
        # which is tp times megakto's global batch; leaving the field out skips that check.
        if ds.get("train_batch_size", "auto") != "auto":
            raise ConfigError(
                f"{source}: remove train_batch_size={_show(ds['train_batch_size'])}; with "
                f"tensor_parallel.autotp_size={tp} DeepSpeed counts all {dims.world_size} ranks "
                f"instead of dp {dp}, and megakto's global batch is train.global_batch_size="
                f"{dims.global_batch_size} (= micro {mb} × grad-accum {ga} × dp {dp})"
            )
        ds.pop("train_batch_size", None)
    else:
        _agree(
            ds, "train_batch_size", mb * ga * dp,
            f"train.global_batch_size={dims.global_batch_size} (= micro {mb} × grad-accum {ga} "
            f"× dp {dp})",
            source,
        )
    _agree(ds, "gradient_clipping", float(cfg.optim.grad_clip),
           f"optim.grad_clip={cfg.optim.grad_clip}", source)

    if bf16 is None:
        bf16 = _bf16_from_dtype(cfg.model.dtype)
    if "bfloat16" in ds:  # DeepSpeed's older spelling of the "bf16" section.
        ds.setdefault("bf16", ds.pop("bfloat16"))
    section = dict(ds.get("bf16") or {})
    _agree(section, "enabled", bool(bf16),
           f"model.dtype={cfg.model.dtype} (bf16 {'on' if bf16 else 'off'})", source, "bf16.enabled")
    ds["bf16"] = section
    fp16 = dict(ds.get("fp16") or {})
    if fp16.get("enabled", False) not in (False, "auto"):
        raise ConfigError(
            f"{source}: fp16.enabled={_show(fp16['enabled'])} is not supported; "
            "use model.dtype=bfloat16 (or float32)"
        )
    fp16["enabled"] = False
    ds["fp16"] = fp16
    _fill_grad_accum_dtype(ds, bool(bf16), stage, dims.pp, source)
    _fill_zero_sizes(ds, on_gpu, hidden_size, source)

    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(
            f'{source}: {leftover} is "auto", which only the Hugging Face Trainer fills in; '
            "give a number"
        )
    return ds


def reference_ds_config(policy_ds: dict, offload: str = "cpu", *, pipeline: bool = False,
                        on_gpu: bool = False) -> dict:
    """ZeRO-3 inference settings for the frozen reference, sharing the policy's batch and dtype.

    No optimizer, scheduler or optimizer offload: the reference never steps. With ``offload="cpu"``
    its parameters live in CPU memory and are fetched layer by layer (``offload_param``), from pinned
    memory on GPU (a copy from pageable memory is staged and synchronous: no overlap, once per
    micro-batch); on CPU pinning means nothing.
    ``pipeline``: a frozen pipeline engine instead, ZeRO stage 0 (pipelines allow 0 or 1, and
    parameter offload needs ZeRO-3), each stage holding its layers.
    """
    if offload not in ("cpu", "none"):
        raise ConfigError(f"ref.offload must be one of 'cpu', 'none', got {offload!r}")
    ref = {key: copy.deepcopy(policy_ds[key]) for key in _REF_COPIED if key in policy_ds}
    if pipeline:
        ref["zero_optimization"] = {"stage": 0}
        return ref
    zero: dict[str, Any] = {
        "stage": 3,
        # Small tensors (norms, biases) stay whole on every rank: gathering them costs more
        # latency than the memory they would save.
        "stage3_param_persistence_threshold": 10000,
    }
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(on_gpu)}
    ref["zero_optimization"] = zero
    return ref
