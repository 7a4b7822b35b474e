"""The DeepSpeed layer: the only modules of megakto that import ``deepspeed``.

``runtime`` (process group, device, CPU threads, accelerator RNG), ``loading`` (a model loaded
under ZeRO-3 and AutoTP, vocabulary split into blocks), ``engines`` (policy, reference and
pipeline engines, their groups, gathered weights), ``generation`` (weights gathered once for a
generation call, one device's memory), ``checkpoint_io`` (DeepSpeed's checkpoint
files and the pickle allow-list), ``convert`` (zero_to_fp32, universal), ``ulysses`` (Ulysses
sequence parallelism: the attention swap and its groups), ``expert`` (AutoEP expert parallelism) and ``vocab_ops`` (DeepSpeed's
vocabulary-parallel log-probs, kept for comparison). Private: the rest of
megakto reaches them through :mod:`megakto.distributed.engine`, which re-exports their names.
"""

import warnings

__all__ = ["runtime", "loading", "engines", "generation", "checkpoint_io", "convert", "ulysses", "vocab_ops", "expert"]

# ZeRO-3 on recent torch calls deprecated collective names on every step; the noise hides real logs.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed.*")
