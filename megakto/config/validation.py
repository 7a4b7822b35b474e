"""Cross-field rules of a loaded :class:`~megakto.config.schema.Config`, checked once at start-up.

Types are already right (the loader coerced every value); these are the ranges and the relations
between keys. The first failure is a one-line :class:`~megakto.errors.ConfigError` naming the keys.
"""

from megakto.config.schema import Config
from megakto.errors import ConfigError

__all__ = ["validate"]


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
        "parallel.tp_size": cfg.parallel.tp_size,
        "parallel.pp_size": cfg.parallel.pp_size,
        "parallel.sp_size": cfg.parallel.sp_size,
        "parallel.ep_size": cfg.parallel.ep_size,
        "train.sample_max_new_tokens": cfg.train.sample_max_new_tokens,
        "health.window": cfg.health.window,
        "health.every_steps": cfg.health.every_steps,
        "health.grad_spike": cfg.health.grad_spike,
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
        "train.max_skipped_steps": cfg.train.max_skipped_steps,  # 0 = never stop
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "kto.sft_weight": cfg.kto.sft_weight,
        "kto.router_aux_coef": cfg.kto.router_aux_coef or 0.0,  # null: the model config's
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip,
        "train.eval_samples": cfg.train.eval_samples or 0,  # null: the planner decides
        "health.warmup_steps": cfg.health.warmup_steps,
        "health.reward_drop": cfg.health.reward_drop,
        "health.kl_rise": cfg.health.kl_rise,
        "health.chance_margin": cfg.health.chance_margin,
        "health.grad_collapse": cfg.health.grad_collapse,
    }
    for key, v in non_negative.items():
        _check(v >= 0, f"{key} must be >= 0, got {v}")
    _check(0.0 < cfg.health.router_collapse <= 1.0,
           f"health.router_collapse must be in (0, 1], got {cfg.health.router_collapse}")
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
    _check_parallel(cfg)
    _check_lora(cfg)


def _check_lora(cfg: Config) -> None:
    """What LoRA (model.lora.r > 0) combines with."""
    lora, tp, pp = cfg.model.lora, cfg.parallel.tp_size, cfg.parallel.pp_size
    _check(lora.r >= 0, f"model.lora.r must be >= 0 (0 = off), got {lora.r}")
    if not lora.r:
        return
    bad = [m for m in lora.target_modules if m in ("embed_tokens", "lm_head", "wte", "embed_out")]
    _check(not bad, f"model.lora.target_modules={','.join(lora.target_modules)}: adapters on {bad} are not supported "
           "(the chunked log-probs and vocabulary blocks read the whole matrix); adapt the attention and MLP "
           "projections, or list the module in model.lora.modules_to_save")
    sp = cfg.parallel.sp_size
    _check(sp == 1, f"model.lora.r={lora.r} with parallel.sp_size={sp}: the LoRA reference (the policy with its adapters "
           "off) does not run sequence-parallel yet; set parallel.sp_size=1 or model.lora.r=0")
    ep = cfg.parallel.ep_size
    _check(ep == 1, f"model.lora.r={lora.r} with parallel.ep_size={ep}: DeepSpeed's AutoEP replaces the MoE blocks "
           "(and the experts peft would adapt) inside deepspeed.initialize, after the adapters are attached; set "
           "parallel.ep_size=1 or model.lora.r=0")
    _check(tp == 1 and pp == 1, f"model.lora.r={lora.r} with parallel.tp_size={tp}, parallel.pp_size={pp}: LoRA runs "
           "under ZeRO 0-3 only (DeepSpeed's AutoTP and the pipeline stages do not carry peft adapters); set "
           "parallel.tp_size=1 and parallel.pp_size=1")
    _check(lora.alpha > 0 and 0.0 <= lora.dropout < 1.0 and bool(lora.target_modules),
           f"model.lora: alpha must be > 0, dropout in [0, 1) and target_modules non-empty; got alpha={lora.alpha}, "
           f"dropout={lora.dropout}, target_modules={lora.target_modules}")


def _check_parallel(cfg: Config) -> None:
    """Which parallel modes combine; the degrees against the model are checked once its config.json
    is read (megakto.model.tp_checks)."""
    tp, pp = cfg.parallel.tp_size, cfg.parallel.pp_size
    _check(not (tp > 1 and pp > 1), f"parallel.tp_size={tp} with parallel.pp_size={pp}: DeepSpeed has no "
           "AutoTP inside a pipeline; use one of them")
    _check_sequence_parallel(cfg)
    part = cfg.parallel.pp_partition
    _check(part in ("parameters", "uniform") or (part.startswith("type:") and len(part) > 5),
           f"parallel.pp_partition={part!r}: expected parameters, uniform or type:<regex>")
    if pp > 1:
        _check(cfg.model.logps != "full", f"model.logps={cfg.model.logps} with parallel.pp_size={pp}: the last "
               "stage scores log-probs with the chunked head; set model.logps=chunked (or auto)")
        blocks = cfg.model.vocab_block_rows
        _check(blocks in (0, "auto"), f"model.vocab_block_rows={blocks} with parallel.pp_size={pp}: the embedding "
               "and the output head are pipeline stages of their own; set model.vocab_block_rows=0 (or auto, "
               "which is off under pipelines)")
    if tp > 1:
        _check(cfg.model.logps != "full", f"model.logps={cfg.model.logps} with parallel.tp_size={tp}: each "
               "rank holds 1/tp of the output head, so only the chunked vocabulary-parallel log-probs are "
               "exact; set model.logps=chunked (or auto)")
        blocks = cfg.model.vocab_block_rows
        _check(blocks in (0, "auto"), f"model.vocab_block_rows={blocks} with parallel.tp_size={tp}: AutoTP "
               "splits the output head itself and needs it whole; set model.vocab_block_rows=0 (or auto, "
               "which is off under tensor parallelism)")


def _check_sequence_parallel(cfg: Config) -> None:
    """What Ulysses sequence parallelism (parallel.sp_size > 1) combines with; the heads, the attention
    implementation and the model family are checked once config.json is read (megakto.model.sp_checks)."""
    sp, tp, pp = cfg.parallel.sp_size, cfg.parallel.tp_size, cfg.parallel.pp_size
    if sp == 1:
        return
    _check(tp == 1, f"parallel.sp_size={sp} with parallel.tp_size={tp}: DeepSpeed has no mesh of Ulysses sequence "
           "parallelism with AutoTP; use one of them")
    _check(pp == 1, f"parallel.sp_size={sp} with parallel.pp_size={pp}: DeepSpeed has no mesh of Ulysses sequence "
           "parallelism with pipelines; use one of them")
    _check(cfg.model.logps != "full", f"model.logps=full with parallel.sp_size={sp}: each rank holds 1/{sp} of every "
           "row's positions and scores them with the chunked head; set model.logps=chunked (or auto)")
    if cfg.data.packing:
        budget = cfg.data.max_tokens_per_row or cfg.data.max_length
        key = "data.max_tokens_per_row" if cfg.data.max_tokens_per_row else "data.max_length (data.max_tokens_per_row: null)"
        _check(budget % sp == 0, f"{key}={budget} is not divisible by parallel.sp_size={sp}: each packed row is cut "
               f"into {sp} equal sequence shards; use a multiple of {sp} such as {-(-budget // sp) * sp}")
