"""The ZeRO (0-3) and tensor-parallel runner: per micro-batch forward, ``backward``, ``step``."""

from __future__ import annotations

from typing import Callable

import torch

from megakto.distributed import comm
from megakto.runners.base import LossFn, Pairs, TrainOutcome

__all__ = ["ZeroRunner"]


class ZeroRunner:
    def __init__(self, engine, *, batch_fn: Callable, logps_fn: Callable, dp_group: comm.ProcessGroup):
        self.engine = engine
        self._batch = batch_fn  # pairs -> PackedBatch on the device
        self._logps = logps_fn  # (model, PackedBatch) -> (logps, n_tokens)
        self.dp_group = dp_group  # tensor-parallel peers hold the same rows: count each once

    @torch.no_grad()
    def score(self, batches: list[Pairs]) -> list[torch.Tensor]:
        return [self._logps(self.engine, self._batch(pairs))[0] for pairs in batches]

    def train(self, batches: list[Pairs], loss_fn: LossFn, *, scale: float, skipped: str | None) -> TrainOutcome:
        out = TrainOutcome(skipped=skipped)
        for i, pairs in enumerate(batches):
            if out.skipped is not None and not out.poisoned:
                break  # nothing accumulated yet: the step is skipped without a backward
            batch = self._batch(pairs)
            logps, n_tokens = self._logps(self.engine, batch)
            micro = loss_fn(i, logps)
            loss = micro.loss
            # One flag over the world, so that every rank of every group skips alike.
            if not out.poisoned and comm.any_rank(not bool(torch.isfinite(loss.detach())),
                                                  group=comm.world_group()):
                out.skipped = "non-finite loss"
                if not out.backwards:
                    out.sums.add_micro(micro, logps=logps, n_tokens=n_tokens, tokens=batch.num_tokens)
                    break
                # Earlier micro-batches' gradients already sit in the engine, which can only drop them at
                # the accumulation boundary: a NaN gradient makes DeepSpeed's overflow check discard the
                # whole step there, and the engine stays in step with its micro-batches.
                out.poisoned = True
                loss = loss * float("nan")
            self.engine.backward(loss * scale)
            self.engine.step()
            out.backwards += 1
            out.sums.add_micro(micro, logps=logps, n_tokens=n_tokens, tokens=batch.num_tokens)
        return out

    def reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        return comm.all_reduce_dict(values, group=self.dp_group)
