"""Rows -> token ids -> KL pairs -> batches. No torch.distributed, no deepspeed: every rank derives
its share of a global batch from dataset indices alone."""

from megakto.data.collate import Batch, collate
from megakto.data.kl_pairs import kl_partners
from megakto.data.rows import count_labels, load_rows, read_source, require_both_classes
from megakto.data.sampler import KTOBatchSampler
from megakto.data.tokenize import TokenizeReport, fit_to_length, prompt_key, tokenize_rows

__all__ = [
    "Batch",
    "collate",
    "load_rows",
    "count_labels",
    "require_both_classes",
    "read_source",
    "prompt_key",
    "tokenize_rows",
    "fit_to_length",
    "TokenizeReport",
    "kl_partners",
    "KTOBatchSampler",
]
