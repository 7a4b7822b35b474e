"""Weights gathered once for a whole generation call, and one device's memory.

Under ZeRO-3 every forward gathers each layer's weights and frees them after it, so a greedy decode
of N tokens gathers the model N times. :func:`gathered_for_generation` gathers it once with
DeepSpeed's ``GatheredParameters`` and lifts the engine's per-module fetch and release hooks for the
call, as DeepSpeed's own ``deepspeed.runtime.zero.unwrap_model_for_generation`` does (the policy's
optimizer and the reference's inference-only ``DeepSpeedZeRoOffload`` keep those hooks alike); the
hooks are registered again on the way out. Every rank of the engine must enter it (the gather is
collective); inside, the whole model sits on each rank, so the planner must say that it fits
(megakto/planning/samples_cost.py). ZeRO-0/1/2 engines hold whole weights: nothing to do.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import deepspeed
from deepspeed.accelerator import get_accelerator

__all__ = ["gathered_for_generation", "device_memory_bytes"]


@contextmanager
def gathered_for_generation(engine):
    """The engine's module with every weight gathered, for the ``with`` block."""
    if not engine.zero_optimization_partition_weights():
        yield engine.module
        return
    optimizer = engine.optimizer
    offload = getattr(optimizer, "parameter_offload", None) or optimizer
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield engine.module
        finally:
            offload._register_deepspeed_module(offload.module)


def device_memory_bytes() -> int:
    """One rank's device memory: its GPU's, or on CPU its share of the host's (DeepSpeed's CPU
    accelerator reports the host's; the node's ranks share it)."""
    total = int(get_accelerator().total_memory())
    if get_accelerator().device_name() == "cpu":
        total //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return total
