"""The one module that imports ``deepspeed``.

Builds the two engines of a KTO run from a local Hugging Face folder (or a hub name):

* the **policy**: loaded under ``HfDeepSpeedConfig`` so that with ZeRO-3 ``from_pretrained`` runs
  inside ``zero.Init`` and a large model never materialises whole on one rank; trained with torch
  AdamW (no JIT-built DeepSpeed optimizer) and a warmup + decay schedule stepped by the engine;
* the **reference**: the same weights in a ZeRO-3 *inference* engine (no optimizer), parameters
  offloaded to CPU by default, frozen, in eval mode.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from functools import partial

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

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
    "build_policy_engine",
    "build_reference_engine",
    "disable_dropout",
    "gathered_state_dict",
]


def configure_cpu_threads() -> None:
    """On CPU, give each local rank its share of the cores unless OMP_NUM_THREADS says otherwise;
    the launcher leaves every rank using all cores, which oversubscribes them (about 4x slower)."""
    if on_gpu() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))


def init_distributed(timeout_minutes: float) -> None:
    """Start the process group (NCCL on GPU, gloo on CPU) with a bounded collective timeout, so
    that if one rank dies the others fail within ``timeout_minutes`` instead of hanging."""
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
               trust_remote_code: bool) -> torch.nn.Module:
    """``from_pretrained`` under the engine's DeepSpeed config (ZeRO-3: partitioned on load)."""
    dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841 -- must stay alive during from_pretrained
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
        use_safetensors=None,
    )
    model._megakto_dschf = dschf  # keep the zero3 flag alive for later HF calls (e.g. generation)
    return model


def build_policy_engine(model: torch.nn.Module, ds_config: dict, *, lr: float, weight_decay: float,
                        betas: tuple[float, float], eps: float, warmup_steps: int, max_steps: int,
                        schedule: str, min_lr_ratio: float):
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        partial(lr_multiplier, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule,
                min_lr_ratio=min_lr_ratio),
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def build_reference_engine(model: torch.nn.Module, ds_config: dict):
    model.eval()
    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full-size CPU copies of every parameter, gathered from ZeRO-3 partitions if need be.
    Collective: every rank of the engine must call it."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
