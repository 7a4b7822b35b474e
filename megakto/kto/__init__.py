"""The KTO math (Ethayarajh et al. 2024): pure functions over tensors.

Nothing here imports torch.distributed or deepspeed; cross-rank reduction of the KL estimate is
the trainer's job (see :mod:`megakto.kto.kl`).
"""

from megakto.kto.kl import finalize_kl, kl_partial, raw_kl
from megakto.kto.logps import sequence_logps
from megakto.kto.loss import KTOLossOutput, kto_loss
from megakto.kto.router_aux import RouterBalance, load_balancing_loss
from megakto.kto.sft import nll_share
from megakto.kto.weights import auto_desirable_weight, check_weights

__all__ = [
    "raw_kl",
    "kto_loss",
    "KTOLossOutput",
    "kl_partial",
    "finalize_kl",
    "sequence_logps",
    "nll_share",
    "RouterBalance",
    "load_balancing_loss",
    "check_weights",
    "auto_desirable_weight",
]
