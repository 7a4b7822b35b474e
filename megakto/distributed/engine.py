"""The DeepSpeed layer's public surface: every name the rest of megakto uses, re-exported from the
private package :mod:`megakto.distributed._deepspeed`, whose modules are the only ones that import
``deepspeed`` (this one does not):

* :mod:`~megakto.distributed._deepspeed.runtime`: process group, device, CPU threads, accelerator RNG;
* :mod:`~megakto.distributed._deepspeed.loading`: ``from_pretrained`` under ZeRO-3 (partitioned on
  load, over the data-parallel group under AutoTP), the vocabulary split into row blocks;
* :mod:`~megakto.distributed._deepspeed.engines`: the policy engine (torch AdamW, warmup + decay),
  the frozen reference engine (ZeRO-3 inference, offloaded to CPU by default), pipeline modules,
  the engines' groups and gathered weights;
* :mod:`~megakto.distributed._deepspeed.generation`: a ZeRO-3 engine's weights gathered once for a
  whole generation call (eval samples), one device's memory;
* :mod:`~megakto.distributed._deepspeed.checkpoint_io`: DeepSpeed's checkpoint files and the
  pickle allow-list every read of them goes through;
* :mod:`~megakto.distributed._deepspeed.convert`: zero_to_fp32 and the universal conversion;
* :mod:`~megakto.distributed._deepspeed.expert`: AutoEP expert parallelism: its presets, the
  optimizer's ``moe`` groups, the expert groups, the transformers registry shim, experts gathered
  back under their Hugging Face names;
* :mod:`~megakto.distributed._deepspeed.ulysses`: Ulysses sequence parallelism's attention swap and
  its groups.
* :mod:`~megakto.distributed._deepspeed.vocab_ops`: DeepSpeed's vocabulary-parallel log-probs behind
  megakto's signature, for the comparison recorded in :mod:`megakto.distributed.vocab_parallel`
  (training uses megakto's own).
"""

from __future__ import annotations

from megakto.distributed._deepspeed.checkpoint_io import (check_deepspeed_pickles, load_checkpoint, save_checkpoint,
                                                          universal_load_config, unsafe_pickle, weights_only_load)
from megakto.distributed._deepspeed.expert import (AUTOEP_PRESETS, allow_string_registry_keys, autoep_preset,
                                                   expert_groups)
from megakto.distributed._deepspeed.convert import (any_stage as universal_any_stage, frozen_mismatch, frozen_params,
                                                    to_universal, zero_fp32_shards)
from megakto.distributed._deepspeed.engines import (build_pipeline_module, build_policy_engine, build_reference_engine,
                                                    disable_dropout, gathered_numel, gathered_state_dict,
                                                    parallel_groups, pipeline_groups, release_engine,
                                                    track_gather_buffers,
                                                    with_moe_leaves, zero3_leaf_classes)
from megakto.distributed._deepspeed.generation import device_memory_bytes, gathered_for_generation
from megakto.distributed._deepspeed.loading import block_vocab, load_model, split_vocab
from megakto.distributed._deepspeed.runtime import (accelerator_rng_state, bf16_supported, configure_cpu_threads,
                                                    device, init_distributed, on_gpu, set_accelerator_rng_state)
from megakto.distributed._deepspeed.ulysses import register_ulysses, sequence_groups
from megakto.distributed._deepspeed.vocab_ops import DEEPSPEED_OPS, deepspeed_token_logps
from megakto.model.load import outside_zero3

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
    "track_gather_buffers",
    "disable_dropout",
    "gathered_state_dict",
    "release_engine",
    "gathered_for_generation",
    "device_memory_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "universal_load_config",
    "to_universal",
    "universal_any_stage",
    "frozen_params",
    "frozen_mismatch",
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
    "register_ulysses",
    "sequence_groups",
    "deepspeed_token_logps",
    "DEEPSPEED_OPS",
    "AUTOEP_PRESETS",
    "autoep_preset",
    "allow_string_registry_keys",
    "expert_groups",
]
