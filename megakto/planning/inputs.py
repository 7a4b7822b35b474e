"""A run's config and DeepSpeed JSON -> :class:`~megakto.planning.plan.PlanInputs`, through the same
checks a real run makes at start-up (:class:`~megakto.distributed.parallel.ParallelDims`,
:func:`~megakto.distributed.ds_config.build_ds_config`), so a bad config fails here with the run's
own one-line error."""

from __future__ import annotations

import os

from megakto.config import Config
from megakto.distributed.ds_config import build_ds_config, grad_accum_bytes, reference_ds_config
from megakto.distributed.parallel import ParallelDims
from megakto.model.families import logit_transform
from megakto.model.vocab_blocks import resolve_block_rows
from megakto.planning.activations import Tokens
from megakto.planning.plan import PlanInputs, lora_params, worst_case_tokens
from megakto.model.shape import ModelShape

__all__ = ["plan_inputs"]


def _logps(model) -> str:
    """``model.logps`` with ``auto`` resolved as the run resolves it (:mod:`megakto.model.families`)."""
    if model.logps != "auto":
        return model.logps
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    return "full" if logit_transform(config) else "chunked"


def _attn(setting: str, sp: int, on_gpu: bool) -> str:
    """The attention the run loads: ``auto`` is sdpa, or under sequence parallelism the device's
    Ulysses core attention (:func:`megakto.model.sp_checks.sp_attention`)."""
    if sp > 1:
        from megakto.model.sp_checks import sp_attention

        return sp_attention(setting, sp, on_gpu=on_gpu)
    return "sdpa" if setting == "auto" else setting


def plan_inputs(cfg: Config, ds: dict, shape: ModelShape, *, world_size: int, on_gpu: bool, gpus_per_node: int = 8,
                source: str = "DeepSpeed config", tokens: Tokens | None = None) -> PlanInputs:
    """``tokens``: the largest micro-batch a rank runs (the dry run's plan of the first steps);
    None = the worst the config allows (micro_batch_size rows of data.max_length tokens)."""
    dims = ParallelDims.from_config(cfg, world_size)
    bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and on_gpu)
    filled = build_ds_config(ds, cfg, dims, bf16=bf16, on_gpu=on_gpu, hidden_size=shape.hidden, source=source)
    d, m = cfg.data, cfg.model
    row = d.max_tokens_per_row or d.max_length
    if tokens is None:
        tokens = worst_case_tokens(cfg.train.micro_batch_size, d.max_length, row, d.packing)
    blocks = 0 if dims.tp > 1 or dims.pp > 1 else resolve_block_rows(m.vocab_block_rows, shape.vocab, shape.hidden)
    lora = lora_params(shape, m.lora.r, m.lora.target_modules) if m.lora.r else 0
    same_weights = os.path.abspath(cfg.ref.path or m.path) == os.path.abspath(m.path)
    ref = "none" if cfg.kto.loss_type == "sft" or (lora and same_weights) else cfg.ref.mode
    return PlanInputs(
        shape=shape, world_size=world_size, dp=dims.dp, tp=dims.tp, pp=dims.pp, sp=dims.sp, ep=dims.ep, grad_accum=dims.grad_accum,
        zero=dict(filled.get("zero_optimization") or {}), ref_zero=reference_ds_config(filled, "none")["zero_optimization"],
        weight_bytes=2 if bf16 else 4,
        accum_bytes=grad_accum_bytes(filled, bf16), on_gpu=on_gpu,
        gpus_per_node=gpus_per_node, ref=ref, ref_offload=cfg.ref.offload == "cpu" and dims.pp == 1,
        checkpointing=m.gradient_checkpointing,
        attn=_attn(m.attn_implementation, dims.sp, on_gpu), logps=_logps(m),
        chunk_tokens=m.logps_chunk_tokens, block_rows=blocks, lora_trainable=lora, train_tokens=tokens,
        precompute_tokens=worst_case_tokens(cfg.train.eval_batch_size, d.max_length, row, d.packing))
