"""Typed run configuration: nested dataclasses, loaded from YAML plus dotted ``key=value`` overrides.

The dotted names (``train.max_steps``, ``kto.beta``, ...) are the user interface: the YAML file is a
mapping of sections, and every override names one leaf. Every field carries its help text in
``field(metadata={"help": ...})`` so :func:`config_help` can list all keys with type and default.

Values are coerced by the field's annotation, in one place (:func:`_coerce`). A string is parsed
the same way whether it came from the command line or from YAML, because PyYAML keeps YAML 1.1
rules and reads ``lr: 1e-5`` as the *string* ``"1e-5"``.

Every failure is a one-line :class:`~megakto.errors.ConfigError` naming the key and what is allowed.
"""

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from megakto._config_hints import unknown_key_hint
from megakto.errors import ConfigError

__all__ = [
    "Config",
    "ModelConfig",
    "DataConfig",
    "KTOConfig",
    "TrainConfig",
    "OptimConfig",
    "RefConfig",
    "CheckpointConfig",
    "DistConfig",
    "load_config",
    "validate",
    "resolve_defaults",
    "config_to_dict",
    "save_config",
    "config_help",
]


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    path: str = _opt("", "Hugging Face model folder (or hub id) of the policy. Required.")
    tokenizer_path: Optional[str] = _opt(None, "Tokenizer folder; null = model.path.")
    disable_dropout: bool = _opt(True, "Set every dropout probability to 0 in policy and reference.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    trust_remote_code: bool = _opt(False, "Allow model code shipped inside the model folder.")
    dtype: Literal["auto", "float32", "bfloat16"] = _opt(
        "auto", "Weights and compute dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    attn_implementation: str = _opt(
        "auto", "Attention implementation for from_pretrained: auto = what transformers picks for the "
        "model (sdpa where the model supports it, else eager), or eager, sdpa, flex_attention, "
        "flash_attention_2, ...; checked against the model before any weights load."
    )
    logps: Literal["chunked", "full"] = _opt(
        "chunked", "chunked = lm_head only on completion positions, in chunks of tokens with a "
        "recomputing backward (no tokens x vocab tensor); full = the model's ordinary logits "
        "(for heads with a bias or logits changed after the head)."
    )
    logps_chunk_tokens: Optional[int] = _opt(
        None, "Tokens per lm_head chunk; null = as many as fit 16M logits (flat memory in vocab size)."
    )
    vocab_block_rows: Union[int, Literal["auto"]] = _opt(
        "auto", "Split the input embedding and output head into blocks of this many vocabulary rows, "
        "each its own parameter, so no gradient, ZeRO-3 gather or optimizer temporary is "
        "vocabulary-sized; auto = 4M elements per block (rows = 4194304 // hidden); 0 = off. "
        "A resumed run must keep its value."
    )


@dataclass
class DataConfig:
    train_files: list[str] = _opt(
        [], "Training JSONL/Parquet files (prompt, completion, label). Required. "
        "Override as 'a.jsonl,b.jsonl' or '[a.jsonl, b.jsonl]'."
    )
    eval_files: list[str] = _opt([], "Evaluation files, same format; empty = no evaluation.")
    max_length: int = _opt(512, "Maximum prompt + completion tokens per row.")
    max_prompt_length: Optional[int] = _opt(
        None, "Maximum prompt tokens (prompts are cut from the left); null = max_length // 2."
    )
    balanced_sampling: bool = _opt(
        True, "Stratify each global batch by label instead of a plain shuffle."
    )
    num_proc: Optional[int] = _opt(None, "Worker processes for tokenization; null = one.")
    packing: bool = _opt(
        True, "Pack each micro-batch's sequences end to end into rows of max_tokens_per_row "
        "(attention stays inside a sequence); false = one sequence per row, right-padded."
    )
    max_tokens_per_row: Optional[int] = _opt(
        None, "Token budget of a packed row; null = max_length (sdpa/eager attention costs grow with "
        "the row length squared; raise it with flash-attention). Must be >= max_length."
    )


@dataclass
class KTOConfig:
    loss_type: Literal["kto", "apo_zero_unpaired", "sft"] = _opt(
        "kto", "kto = KTO with the KL reference point z_0 (Ethayarajh et al. 2024); "
        "apo_zero_unpaired = no KL term (no KL forward passes); sft = plain causal-LM loss on every "
        "completion, labels ignored, no reference (a throughput baseline on the same engine)."
    )
    beta: float = _opt(0.1, "Scale of the implied reward beta * log(pi / pi_ref); > 0.")
    desirable_weight: Union[float, Literal["auto"]] = _opt(
        1.0, "lambda_D, weight of desirable rows; 'auto' = lambda_U * n_U / n_D from the label "
        "counts, so the eq. (8) ratio lambda_D * n_D / (lambda_U * n_U) is 1 "
        "(paper: keep it in [1, 4/3])."
    )
    undesirable_weight: float = _opt(1.0, "lambda_U, weight of undesirable rows; > 0.")
    kl_scope: Literal["step", "microbatch"] = _opt(
        "step", "Rows that share one KL estimate z_0: step = the whole global batch of the "
        "optimizer step (all micro-batches, all ranks); microbatch = each micro-batch, as TRL does."
    )
    sft_weight: float = _opt(
        0.0, "Weight of an added negative log-likelihood term on desirable completions; 0 = off."
    )
    allow_single_class: bool = _opt(
        False, "Allow data with only desirable or only undesirable rows (normally an error)."
    )


@dataclass
class TrainConfig:
    max_steps: int = _opt(100, "Optimizer steps to run.")
    global_batch_size: int = _opt(
        16, "Rows per optimizer step over all ranks = micro_batch_size x grad-accum x dp."
    )
    micro_batch_size: int = _opt(4, "Rows per forward pass per data-parallel rank.")
    log_every: int = _opt(1, "Log metrics every N optimizer steps.")
    eval_every: int = _opt(
        0, "Evaluate every N optimizer steps, and once before training (the reference model's "
        "baseline); 0 = only at the end. Needs data.eval_files."
    )
    eval_batch_size: int = _opt(8, "Rows per evaluation forward pass per data-parallel rank.")
    resume: str = _opt(
        "none", "auto = continue from the newest checkpoint in output_dir if any; "
        "none = start fresh; otherwise a checkpoint directory."
    )
    export_hf: bool = _opt(
        False, "At the end, write output_dir/hf (safetensors, config, tokenizer) from a final "
        "checkpoint, saved even when checkpoint.every_steps=0."
    )
    max_skipped_steps: int = _opt(
        3, "Stop with an error after this many consecutive optimizer steps skipped for a non-finite "
        "loss, KL or gradient norm (no save: the last checkpoint stays as it was); 0 = never stop."
    )


@dataclass
class OptimConfig:
    lr: float = _opt(5e-6, "Peak learning rate of torch AdamW.")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay.")
    betas: list[float] = _opt([0.9, 0.999], "AdamW (beta1, beta2).")
    eps: float = _opt(1e-8, "AdamW epsilon.")
    warmup_steps: int = _opt(0, "Linear warm-up from 0 to lr over this many steps.")
    schedule: Literal["cosine", "linear", "constant"] = _opt(
        "cosine", "LR decay after warm-up, down to lr * min_lr_ratio at max_steps."
    )
    min_lr_ratio: float = _opt(0.0, "Final LR as a fraction of lr, in [0, 1].")
    grad_clip: float = _opt(
        1.0, "Clip the global gradient norm to this (DeepSpeed gradient_clipping); 0 = off."
    )


@dataclass
class RefConfig:
    mode: Literal["online", "cache"] = _opt(
        "online", "online = frozen reference forward every step; "
        "cache = reference log-probs computed once before training."
    )
    offload: Literal["cpu", "none"] = _opt(
        "cpu", "cpu = keep the ZeRO-3 reference parameters in CPU memory (offload_param)."
    )
    path: Optional[str] = _opt(None, "Reference model folder; null = model.path.")
    cache_dir: Optional[str] = _opt(
        None, "ref.mode=cache: where reference log-probs are stored, keyed by token content and a "
        "fingerprint of the reference weights; null = output_dir/ref_cache."
    )


@dataclass
class CheckpointConfig:
    every_steps: int = _opt(0, "Save a DeepSpeed checkpoint every N optimizer steps; 0 = never.")
    keep_last: int = _opt(
        2, "Keep only the newest N complete checkpoints (>= 1); the newest complete one is never deleted."
    )


@dataclass
class DistConfig:
    timeout_minutes: float = _opt(10.0, "Timeout of collective operations (process group).")


@dataclass
class Config:
    output_dir: str = _opt("outputs/run", "Run directory: checkpoints, logs, resolved config.")
    seed: int = _opt(0, "Seed for sampling, KL pairing and model init.")
    model: ModelConfig = _section(ModelConfig, "Policy model and tokenizer.")
    data: DataConfig = _section(DataConfig, "Datasets and tokenization.")
    kto: KTOConfig = _section(KTOConfig, "KTO loss.")
    train: TrainConfig = _section(TrainConfig, "Steps, batch sizes, evaluation, resume.")
    optim: OptimConfig = _section(OptimConfig, "AdamW and learning-rate schedule.")
    ref: RefConfig = _section(RefConfig, "Frozen reference model.")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "Checkpoint saving.")
    dist: DistConfig = _section(DistConfig, "torch.distributed settings.")


# ---------------------------------------------------------------------------------------------
# Schema walking


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaf_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, type, Field) for every leaf, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_section(tp):
            out += _leaf_keys(tp, prefix + f.name + ".")
        else:
            out.append((prefix + f.name, tp, f))
    return out


def _unknown_key(key: str, cls: type, prefix: str) -> ConfigError:
    name = key[len(prefix):].split(".")[0]
    valid = sorted(f.name for f in dataclasses.fields(cls))
    where = f"valid keys in '{prefix[:-1]}'" if prefix else "valid top-level keys"
    msg = f"unknown config key '{key}'; {where}: {', '.join(valid)}"
    sections = [f.name for f in dataclasses.fields(cls) if _is_section(_hints(cls)[f.name])]
    hint = unknown_key_hint(key, prefix, valid, sections, [k for k, _, _ in _leaf_keys()])
    if hint:
        msg += f"; {hint}"
    return ConfigError(msg)


# ---------------------------------------------------------------------------------------------
# Value coercion

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_NULL = {"null", "none", "~"}


class _Bad(Exception):
    """Internal: the value does not fit the type; the caller adds the key."""


def _describe(tp: Any, verbose: bool = True) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        choices = ", ".join(repr(c) for c in get_args(tp))
        return choices if len(get_args(tp)) == 1 else f"one of {choices}"
    if origin is Union:
        return " or ".join(_describe(a, verbose) for a in get_args(tp))
    if origin is list:
        return f"list of {_describe(get_args(tp)[0], verbose)}"
    if tp is bool and verbose:
        return "bool (true/false/1/0/yes/no)"
    return tp.__name__


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ``_Bad``. Strings are parsed as text."""
    origin = get_origin(tp)
    text = value.strip() if isinstance(value, str) else None

    if origin is Union:
        args = get_args(tp)
        if type(None) in args and (value is None or (text is not None and text.lower() in _NULL)):
            return None
        # Literal arms first, so "auto" is not tried as a float.
        arms = [a for a in args if a is not type(None)]
        for arm in sorted(arms, key=lambda a: get_origin(a) is not Literal):
            try:
                return _coerce(value, arm)
            except _Bad:
                pass
        raise _Bad
    if origin is Literal:
        if value in get_args(tp) or text in get_args(tp):
            return text if text is not None else value
        raise _Bad
    if origin is list:
        (elem,) = get_args(tp)
        if text is not None:
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise _Bad from None
            else:
                value = [p.strip() for p in text.split(",") if p.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Bad
        return [_coerce(v, elem) for v in value]
    if tp is bool:
        if text is not None:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise _Bad
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _Bad
    if tp is int:
        if text is not None:
            try:
                return int(text)
            except ValueError:
                raise _Bad from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Bad
    if tp is float:
        if text is not None:
            try:
                return float(text)
            except ValueError:
                raise _Bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad
    raise TypeError(f"unsupported config annotation {tp!r}")


def _set_leaf(obj: Any, cls: type, key: str, name: str, value: Any, origin: str) -> None:
    tp = _hints(cls)[name]
    try:
        setattr(obj, name, _coerce(value, tp))
    except _Bad:
        msg = f"config key '{key}' expects {_describe(tp)}, got {value!r} ({origin})"
        choices = _literal_choices(tp)
        if choices and isinstance(value, str):
            close = difflib.get_close_matches(value.strip(), choices, n=1)
            if close:
                msg += f"; did you mean '{close[0]}'?"
        raise ConfigError(msg) from None


def _literal_choices(tp: Any) -> list[str]:
    if get_origin(tp) is Literal:
        return [c for c in get_args(tp) if isinstance(c, str)]
    if get_origin(tp) is Union:
        return [c for a in get_args(tp) for c in _literal_choices(a)]
    return []


def _field(cls: type, key: str, prefix: str, name: str) -> Any:
    if not isinstance(name, str) or name not in _hints(cls):
        raise _unknown_key(key, cls, prefix)
    return _hints(cls)[name]


def _apply_mapping(obj: Any, mapping: dict, prefix: str, origin: str) -> None:
    cls = type(obj)
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        tp = _field(cls, key, prefix, name)
        if _is_section(tp):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{key}' is a section and needs a mapping of its keys, "
                    f"got {value!r} ({origin})"
                )
            _apply_mapping(getattr(obj, name), value, key + ".", origin)
        else:
            _set_leaf(obj, cls, key, name, value, origin)


def _apply_override(cfg: Config, override: str) -> None:
    if "=" not in override:
        raise ConfigError(
            f"override '{override}' has no '='; write dotted key=value, e.g. train.max_steps=10"
        )
    key, value = override.split("=", 1)
    key = key.strip()
    origin = "command-line override"
    obj, prefix = cfg, ""
    parts = key.split(".")
    for i, name in enumerate(parts):
        cls = type(obj)
        tp = _field(cls, key, prefix, name)
        last = i == len(parts) - 1
        if _is_section(tp):
            if last:
                first = dataclasses.fields(tp)[0].name
                raise ConfigError(
                    f"config key '{key}' is a section; override one of its keys, "
                    f"e.g. {key}.{first}=..."
                )
            obj, prefix = getattr(obj, name), prefix + name + "."
        elif not last:
            raise ConfigError(f"config key '{prefix}{name}' is not a section; cannot set '{key}'")
        else:
            _set_leaf(obj, cls, key, name, value, origin)


# ---------------------------------------------------------------------------------------------
# Public API


def load_config(yaml_path: Optional[str], overrides: list[str]) -> Config:
    """Defaults <- YAML file (if any) <- overrides in order; then validate and fill derived defaults."""
    cfg = Config()
    if yaml_path is not None:
        if not os.path.isfile(yaml_path):
            raise ConfigError(f"config file not found: {yaml_path}")
        with open(yaml_path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark is not None else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(
                    f"config file {yaml_path} is not valid YAML{where}: {problem}"
                ) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {yaml_path} must hold a mapping of sections (model:, data:, ...), "
                f"got {type(data).__name__}"
            )
        _apply_mapping(cfg, data, "", f"in {yaml_path}")
    for override in overrides:
        _apply_override(cfg, override)
    validate(cfg)
    return resolve_defaults(cfg)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Check cross-field rules once at start-up; raise a one-line ConfigError on the first failure."""
    _check(bool(cfg.model.path), "model.path is required (a Hugging Face model folder); "
           "set it in the YAML or pass model.path=PATH")
    _check(bool(cfg.data.train_files), "data.train_files is required (one or more data files); "
           "set it in the YAML or pass data.train_files=a.jsonl,b.jsonl")
    positive = {
        "data.max_length": cfg.data.max_length,
        "train.max_steps": cfg.train.max_steps,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.log_every": cfg.train.log_every,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "kto.beta": cfg.kto.beta,
        "kto.undesirable_weight": cfg.kto.undesirable_weight,
        "optim.lr": cfg.optim.lr,
        "optim.eps": cfg.optim.eps,
        "dist.timeout_minutes": cfg.dist.timeout_minutes,
    }
    if cfg.kto.desirable_weight != "auto":
        positive["kto.desirable_weight"] = cfg.kto.desirable_weight
    if cfg.data.max_prompt_length is not None:
        positive["data.max_prompt_length"] = cfg.data.max_prompt_length
    if cfg.data.num_proc is not None:
        positive["data.num_proc"] = cfg.data.num_proc
    for key, v in positive.items():
        _check(v > 0, f"{key} must be > 0, got {v}")
    non_negative = {
        "train.eval_every": cfg.train.eval_every,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "kto.sft_weight": cfg.kto.sft_weight,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip,
    }
    for key, v in non_negative.items():
        _check(v >= 0, f"{key} must be >= 0, got {v}")
    _check(0.0 <= cfg.optim.min_lr_ratio <= 1.0,
           f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    betas = cfg.optim.betas
    _check(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
           f"optim.betas must be two numbers in [0, 1), got {betas}")
    mpl = cfg.data.max_prompt_length
    if mpl is not None:
        _check(mpl < cfg.data.max_length, f"data.max_prompt_length={mpl} must be < "
               f"data.max_length={cfg.data.max_length} to leave room for the completion")
    _check(cfg.data.max_length >= 2, f"data.max_length must be >= 2, got {cfg.data.max_length}")
    mtr = cfg.data.max_tokens_per_row
    if mtr is not None:
        _check(mtr >= cfg.data.max_length, f"data.max_tokens_per_row={mtr} must be >= "
               f"data.max_length={cfg.data.max_length}: a sequence is never split across packed rows")
    if cfg.model.vocab_block_rows != "auto":
        _check(cfg.model.vocab_block_rows >= 0,
               f"model.vocab_block_rows must be auto or >= 0 (0 = off), got {cfg.model.vocab_block_rows}")
    if cfg.model.logps_chunk_tokens is not None:
        _check(cfg.model.logps_chunk_tokens >= 1,
               f"model.logps_chunk_tokens must be >= 1, got {cfg.model.logps_chunk_tokens}")
    _check(bool(cfg.train.resume.strip()), "train.resume must be 'auto', 'none' or a checkpoint path")
    # The micro-batch divides the global batch whatever the data-parallel size; ParallelDims checks
    # the rest once the world size is known.
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    _check(gbs % mbs == 0, f"train.global_batch_size={gbs} is not divisible by "
           f"train.micro_batch_size={mbs}")
    if cfg.kto.loss_type == "kto":
        # z_0 is estimated from mismatched (x_i, y_j) pairs drawn over the global batch (whatever the
        # KL scope), so one row per step has no partner.
        _check(gbs >= 2, f"kto.loss_type='kto' needs train.global_batch_size >= 2 to pair rows for "
               f"the KL estimate, got {gbs}; use kto.loss_type=apo_zero_unpaired for no KL term")


def resolve_defaults(cfg: Config) -> Config:
    """Fill the keys whose null default means "same as another key", so the saved config is explicit."""
    if cfg.model.tokenizer_path is None:
        cfg.model.tokenizer_path = cfg.model.path
    if cfg.ref.path is None:
        cfg.ref.path = cfg.model.path
    if cfg.data.max_prompt_length is None:
        cfg.data.max_prompt_length = cfg.data.max_length // 2
    if cfg.data.max_tokens_per_row is None:
        cfg.data.max_tokens_per_row = cfg.data.max_length
    if cfg.ref.cache_dir is None:
        cfg.ref.cache_dir = os.path.join(cfg.output_dir, "ref_cache")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (str, int, float, bool, None, lists) for YAML dumps and loggers."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal Config."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False, default_flow_style=False)


def config_help() -> str:
    """One line per dotted key: ``key: type = default  help``."""
    rows = []
    for key, tp, f in _leaf_keys():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # Defaults are shown as they are written in YAML (null, true, [0.9, 0.999]).
        left = f"{key}: {_describe(tp, verbose=False)} = {json.dumps(default)}"
        rows.append((left, f.metadata["help"]))
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"{left.ljust(width)}  {help}" for left, help in rows)
