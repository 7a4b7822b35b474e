"""megakto: KTO training at DeepSpeed scale.

The top-level package exports only the pure KTO math, so ``import megakto`` never pulls in
deepspeed or torch.distributed.
"""

from megakto.kto import finalize_kl, kl_partial, kto_loss

__all__ = ["kto_loss", "kl_partial", "finalize_kl"]
__version__ = "0.1.0"
