"""DeepSpeed's Ulysses sequence parallelism for Hugging Face models (ALST,
``deepspeed.runtime.sequence_parallel.ulysses_sp``), wired the way megakto's sequence-parallel mode
needs it (megakto.runners.sequence):

* ``UlyssesSPAttentionHF.register_with_transformers`` builds DeepSpeed's sequence groups (ranks
  ``[i·sp, (i+1)·sp)``) and their ``mpu``, and swaps the model's core attention, process-wide, for
  the all-to-all wrapper around it. It runs once per process; the frozen reference shares the
  swapped attention (same head geometry) and the groups.
* Every micro-batch reaches it as **one row** (megakto.data.sp_shards lays packed rows end to end),
  so the row count baked in at registration is 1, whatever the rows of the micro-batch; the length
  varies (``seq_length_is_variable``).
* ``disable_in_eval=False``: with True, a module in eval mode (the reference always, the policy in
  evaluation) would bypass the all-to-all and attend within its own shard only, silently.
* The ``mpu`` has no data-parallel group: DeepSpeed reduces gradients over sequence × data ranks.
  KTO's KL estimate, metrics and evaluation split and reduce over the ranks that hold different
  rows, the ranks with the same place in their sequence group, built here.
"""

from __future__ import annotations

import deepspeed.comm as ds_comm
import torch

__all__ = ["register_ulysses", "sequence_groups"]

_registered: dict = {}  # the one registration of this process: settings -> mpu


def register_ulysses(model: torch.nn.Module, sp: int, core_attn: str):
    """Swap ``core_attn`` (the implementation ``model`` was loaded with) for Ulysses over ``sp``
    ranks; returns DeepSpeed's ``mpu`` for ``deepspeed.initialize``. A second call with the same
    settings returns the first one's ``mpu``; other settings raise (DeepSpeed allows one)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    key = (sp, core_attn)
    if _registered:
        if key not in _registered:
            raise RuntimeError(f"Ulysses is already registered as {next(iter(_registered))} in this process; "
                               f"cannot register {key}")
        return _registered[key]
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=core_attn, sequence_parallel_size=sp,
        micro_batch_size=1, seq_length_is_variable=True, disable_in_eval=False)
    _registered[key] = mpu
    return mpu


def sequence_groups(mpu, sp: int):
    """``(data-parallel group, sequence-parallel group)`` of this rank: DeepSpeed's sequence group and
    the ranks holding the same shard of other rows (``{s, s + sp, s + 2·sp, ...}``), made here
    (every rank creates every one of those groups, in the same order)."""
    world = ds_comm.get_world_size()
    mine = None
    for s in range(sp):
        ranks = list(range(s, world, sp))
        group = ds_comm.new_group(ranks)
        if ds_comm.get_rank() in ranks:
            mine = group
    return mine, mpu.get_sequence_parallel_group()
