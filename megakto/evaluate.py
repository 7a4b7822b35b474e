"""Held-out evaluation: KTO loss, KL estimate, reward accuracy and margin on an eval split.

Rows are spread over the data-parallel ranks with
:func:`~megakto.distributed.sharded.score_sharded` (every rank runs the same number of forwards:
ZeRO-3 gathers parameters collectively). Each row's log-probs are computed on exactly one rank,
so summing the per-rank vectors assembles the full ones everywhere. KL rows use one fixed partner
per row (:func:`megakto.data.kl_pairs.dataset_kl_partners`), so evaluations are comparable over a
run. The rows come as :class:`~megakto.reference.sequences.SplitSequences`: token ids are read from
the Arrow table per batch, for this rank's share only, so a large eval file costs ~20 bytes a
sequence of memory, not its token ids.
"""

from __future__ import annotations

from typing import Callable

import torch

from megakto.data.split import TokenizedSplit
from megakto.distributed import comm
from megakto.distributed.sharded import score_sharded
from megakto.kto import finalize_kl, kl_partial, kto_loss
from megakto.kto.reward_accuracy import reward_accuracy
from megakto.reference.sequences import Sequences

__all__ = ["Evaluator"]


class Evaluator:
    def __init__(self, split: TokenizedSplit, sequences: Sequences, *, has_kl: bool, dp_rank: int, dp_size: int,
                 batch_size: int, dp_group: comm.ProcessGroup):
        n = len(split) * (2 if has_kl else 1)
        if len(sequences) != n:
            raise ValueError(f"{len(sequences)} sequences for {len(split)} rows (has_kl={has_kl}): want {n}")
        self.split = split
        self.sequences = sequences  # the targets at 0..n-1, then with a KL term each row's KL row
        self.has_kl = has_kl
        self.dp_rank, self.dp_size, self.batch_size = dp_rank, dp_size, batch_size
        self.dp_group = dp_group  # tensor-parallel peers score the same rows: sum over dp ranks only
        self._reference: torch.Tensor | None = None  # the reference never changes: computed once

    def _gather(self, logps_fn: Callable[[list], torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(self.sequences), dtype=torch.float64)
        for positions, values in score_sharded(range(len(self.sequences)),
                                               lambda ps: logps_fn(self.sequences.fetch(ps)),
                                               dp_rank=self.dp_rank, dp_size=self.dp_size, batch_size=self.batch_size):
            out[positions] = values
        return comm.all_reduce_sum(out, group=self.dp_group)

    @torch.no_grad()
    def __call__(self, policy_logps: Callable[[list], torch.Tensor], reference_logps: Callable[[list], torch.Tensor],
                 *, beta: float, desirable_weight: float, undesirable_weight: float,
                 loss_type: str) -> dict[str, float]:
        if self._reference is None:
            self._reference = self._gather(reference_logps)
        policy = self._gather(policy_logps)
        n = len(self.split)
        if self.has_kl:
            kl = finalize_kl(*kl_partial(policy[n:], self._reference[n:])).double()
        else:
            kl = torch.zeros((), dtype=torch.float64)
        desirable = torch.from_numpy(self.split.label)
        out = kto_loss(policy[:n], self._reference[:n], desirable, kl, beta=beta,
                       desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                       loss_type=loss_type)
        acc = reward_accuracy(out.rewards, self.split.label, self.split.prompt_key)
        return {"loss": float(out.losses.mean()), "kl": float(kl), "reward_accuracy": acc.accuracy,
                "rewards/margins": acc.margin, "pairs": float(acc.pairs)}
