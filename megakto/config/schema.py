"""The run configuration's schema: one dataclass per YAML section, every field with its default
and its help text.

The dotted names (``train.max_steps``, ``kto.beta``, ...) are the user interface: the YAML file is a
mapping of sections, and every override names one leaf. Every field carries its help text in
``field(metadata={"help": ...})`` so :func:`~megakto.config.help.config_help` can list all keys with
type and default. Reading, coercing and checking values is :mod:`megakto.config.loader`'s job; the
helpers at the end walk the schema for it.
"""

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Optional, Union, get_type_hints

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
    "ParallelConfig",
    "HealthConfig",
]


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class LoraSettings:
    r: int = _opt(0, "LoRA rank (peft adapters on the policy, base weights frozen; the reference is the "
                  "policy with its adapters off); 0 = off, full fine-tuning.")
    alpha: float = _opt(16.0, "LoRA alpha: the adapter update is (alpha / r) * B @ A.")
    dropout: float = _opt(0.0, "Dropout on the adapters' input.")
    target_modules: list[str] = _opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get adapters (the attention and MLP projections); not the embedding or head."
    )
    modules_to_save: list[str] = _opt([], "Modules trained in full beside the adapters (e.g. a norm).")


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
    packing_check: bool = _opt(
        True, "At start-up, score a few short sequences packed and alone through the policy (its device, "
        "dtype and attention) and stop if they differ beyond rounding: packed sequences seeing each "
        "other; seconds of three small forwards. Skipped under pipeline parallelism."
    )
    logps: Literal["auto", "chunked", "full"] = _opt(
        "auto", "chunked = lm_head only on completion positions, in chunks of tokens with a "
        "recomputing backward (no tokens x vocab tensor); full = the model's ordinary logits "
        "(for heads with a bias or logits changed after the head); auto = chunked, or full for a "
        "model that changes its logits after the head (Gemma 2 soft-capping), logged at start-up."
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
    lora: LoraSettings = _section(LoraSettings, "LoRA adapters (peft); r = 0 is off.")


@dataclass
class DataConfig:
    train_files: list[str] = _opt(
        [], "Training JSONL/Parquet files: rows (prompt, completion, label) or conversations (messages, label), "
        "optionally with a weight (docs/data.md). Required. "
        "Override as 'a.jsonl,b.jsonl' or '[a.jsonl, b.jsonl]'."
    )
    eval_files: list[str] = _opt([], "Evaluation files, same format; empty = no evaluation.")
    max_length: int = _opt(512, "Maximum prompt + completion tokens per row.")
    max_prompt_length: Optional[int] = _opt(
        None, "Maximum prompt tokens (prompts are cut from the left); null = max_length // 2."
    )
    overlong: Literal["truncate", "drop"] = _opt(
        "truncate", "A row longer than max_length: truncate = keep the end of the prompt and the start of "
        "the completion; drop = leave out every row whose completion would lose tokens (each one is "
        "reported), for data whose label is decided by the end of the completion."
    )
    balanced_sampling: bool = _opt(
        True, "Stratify each global batch by label instead of a plain shuffle."
    )
    num_proc: Optional[int] = _opt(
        None, "Worker processes for tokenization (datasets' map, cached for the next run); null = one per "
        "50,000 rows, up to the cores available and at most 8.")
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
    router_aux_coef: Optional[float] = _opt(
        None, "Mixture-of-experts policies: weight of the router's load-balancing loss (Switch "
        "Transformer's, as transformers computes it) over the target rows' tokens, added to the "
        "policy's loss once per micro-batch; logged as router/aux_loss with the experts' loads. "
        "null = the model config's router_aux_loss_coef (0 for dense models); 0 = off (router logits "
        "are not even requested). A non-zero value on a dense model is an error."
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
    health_checks: bool = _opt(
        True, "Warn (log line and TensorBoard text 'health') when the step metrics show a failing run: "
        "both rewards falling, KL rising, margin flat, saturated sigmoids, KL clamped at 0, one-class "
        "micro-batches, gradient spikes, held-out accuracy at chance, a collapsed MoE router; thresholds in "
        "the health section."
    )
    eval_samples: Optional[int] = _opt(
        None, "At each evaluation, greedy completions of this many fixed held-out prompts from the policy "
        "and the reference, to TensorBoard text 'samples' and output_dir/samples.jsonl; 0 = off; null = 3 "
        "where the planner estimates they cost under 3% of the training between evaluations and the "
        "gathered model fits on one device, else off with a log line giving their cost."
    )
    sample_max_new_tokens: int = _opt(24, "Longest eval sample completion, in tokens.")


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
class ParallelConfig:
    tp_size: int = _opt(
        1, "Tensor-parallel degree (DeepSpeed AutoTP): each layer's matmuls and the output head split "
        "over this many ranks, which see the same rows; it must divide the world size, the attention "
        "and key-value heads, the MLP width and the vocabulary. 1 = off."
    )
    pp_size: int = _opt(
        1, "Pipeline-parallel degree (deepspeed.pipe, 1F1B): the model's layers split into this many "
        "stages on as many ranks, which see the same rows; needs ZeRO stage 0 or 1 and tp_size 1. 1 = off."
    )
    pp_partition: str = _opt(
        "parameters", "How layers are split over pipeline stages: parameters (balance parameter counts; "
        "the embedding and the output head count as layers), uniform (balance layer counts), or "
        "type:<regex> (balance the layers whose class matches, e.g. type:DecoderStage)."
    )
    sp_size: int = _opt(
        1, "Sequence-parallel degree (DeepSpeed Ulysses, under ZeRO-3): each micro-batch's tokens are cut "
        "into this many equal shards on as many ranks, which see the same rows, so activations per rank "
        "shrink sp_size times (long completions); it must divide the world size, the attention heads and "
        "data.max_tokens_per_row; tp_size and pp_size 1. 1 = off."
    )
    ep_size: int = _opt(
        1, "Expert-parallel degree for mixture-of-experts models (DeepSpeed AutoEP): each MoE layer's experts "
        "are split over groups of this many ranks and tokens are sent to their experts by all-to-all; the "
        "ranks of a group see different rows (every rank is data-parallel for the dense weights). It must "
        "divide the world size and the model's expert count; tp_size, pp_size and sp_size 1. 1 = off."
    )


@dataclass
class HealthConfig:
    window: int = _opt(20, "Steps over which each trend (rewards, KL, margin, gradient norm) is measured.")
    warmup_steps: int = _opt(50, "Steps before the margin, the held-out accuracy and a zero KL are judged.")
    reward_drop: float = _opt(
        0.5, "Warn when the rewards of desirable and of undesirable completions both fall by more than "
        "this over the window (likelihood displacement)."
    )
    kl_rise: float = _opt(5.0, "Warn when the KL estimate rises steadily by more than this (nats) over the window.")
    chance_margin: float = _opt(0.05, "Held-out reward accuracy within this of 0.5 counts as chance.")
    grad_collapse: float = _opt(
        0.01, "Warn when the gradient norm stays below this fraction of its run maximum over the window "
        "while the loss stops moving (saturated sigmoids)."
    )
    grad_spike: float = _opt(10.0, "Warn when the gradient norm exceeds this multiple of its window median.")
    router_collapse: float = _opt(
        0.9, "Mixture-of-experts policies: warn when, in every step of the window, one expert of a MoE layer "
        "received at least this share of the step's tokens (router/layer{i}/load_max; balanced is top-k / "
        "experts) while another received less (the router collapsing onto a few experts)."
    )
    every_steps: int = _opt(50, "Report each symptom at most once per this many steps.")


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
    parallel: ParallelConfig = _section(ParallelConfig, "Tensor, pipeline and sequence parallelism.")
    health: HealthConfig = _section(HealthConfig, "Thresholds of the training-health warnings (train.health_checks).")
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
