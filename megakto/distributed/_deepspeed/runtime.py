"""The DeepSpeed runtime of a rank: its process group, its device, its CPU threads and its
accelerator's random state."""

from __future__ import annotations

import importlib
import os
from datetime import timedelta

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

__all__ = ["configure_cpu_threads", "init_distributed", "device", "on_gpu", "bf16_supported",
           "accelerator_rng_state", "set_accelerator_rng_state"]


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


def accelerator_rng_state() -> torch.Tensor | None:
    """The accelerator's generator state; None on CPU, where it is torch's CPU generator."""
    return get_accelerator().get_rng_state() if on_gpu() else None


def set_accelerator_rng_state(state: torch.Tensor | None) -> None:
    if state is not None and on_gpu():
        get_accelerator().set_rng_state(state)
