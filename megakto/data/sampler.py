"""Label-balanced, resumable global-batch sampler.

The sampler hands out *global* batches of dataset indices: every rank draws the same sequence
(same seed, no communication). It does not arrange rows into micro-batches: the trainer splits
each global batch with ``megakto.data.packing.plan_micro_batches`` (equal rows, near-equal
tokens, both classes in every micro-batch whenever each class has at least ``num_micro_batches``
rows in the batch).

Two properties matter for KTO and are tested:

* **Each global batch depends on (labels, global_batch_size, seed, balanced, position) only**,
  order included, never on the data-parallel x grad-accum layout. So (DP1, GA4), (DP2, GA2) and
  (DP4, GA1) train on the same global batches, and a run may resume on a different layout.
* **Balanced mode (default) keeps both classes in every batch.** A batch with one class leaves
  one side of eq. (7) of Ethayarajh et al. (2024) without examples, so the per-class weights of
  eq. (8) stop meaning what they say and per-class metrics become 0/0 (the classic NaN reward
  logs in peer trainers). Each global batch takes the dataset's class ratio to within one row
  (cumulative rounding): its desirable rows, then its undesirable rows, each as drawn from the
  class's stream.

Rows are never dropped: each stream is an endless chain of per-epoch seeded permutations; the
tail of epoch e is followed by the head of epoch e+1, so every row of an epoch is used once before
any row is used twice. The price is that a global batch straddling an epoch boundary can hold the
same row twice (once from each epoch); that is rare and only reweights one row for one step.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["KTOBatchSampler"]

_STATE_VERSION = 1


def _epoch_seed(seed: int, tag: str, epoch: int) -> int:
    # sha256 of (seed, stream tag, epoch): never hash() (salted per process); 63 bits so it fits
    # torch.Generator.manual_seed on every platform.
    digest = hashlib.sha256(f"megakto.sampler:{tag}:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Stream:
    """An endless sequence over ``indices``: permutation of epoch 0, then of epoch 1, ..."""

    def __init__(self, indices, seed: int, tag: str):
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.seed = seed
        self.tag = tag
        self.position = 0  # rows consumed so far, across epochs
        self._cached_epoch = -1
        self._cached_order = torch.empty(0, dtype=torch.long)  # a tensor: 8 bytes a row, not 36

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.tag, epoch))
            perm = torch.randperm(len(self.indices), generator=gen)
            self._cached_order = self.indices[perm]
            self._cached_epoch = epoch
        return self._cached_order

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        size = len(self.indices)
        while len(out) < n:
            epoch, offset = divmod(self.position, size)
            k = min(n - len(out), size - offset)
            out.extend(self._order(epoch)[offset : offset + k].tolist())
            self.position += k
        return out


class KTOBatchSampler:
    """Endless source of global batches of dataset indices; see the module docstring.

    Args:
        labels: one bool per dataset row, True for desirable.
        global_batch_size: rows per optimizer step over all ranks (G).
        seed: base seed; per-epoch permutations are derived from it.
        balanced: stratify by label (default). False: one uniform stream over all rows.
    """

    def __init__(
        self,
        labels: Sequence[bool],
        *,
        global_batch_size: int,
        seed: int,
        balanced: bool = True,
    ):
        flags = np.asarray(labels, dtype=bool).reshape(-1)
        n = len(flags)
        if n == 0:
            raise ValueError("KTOBatchSampler needs at least one row")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1; got {global_batch_size}")
        if global_batch_size > n:
            raise ValueError(
                f"global_batch_size {global_batch_size} exceeds the dataset's {n} rows; every "
                "global batch would repeat rows"
            )
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.balanced = bool(balanced)
        self._num_rows = n
        self._num_desirable = int(flags.sum())
        self._labels_crc32 = zlib.crc32(flags.astype(np.uint8).tobytes())  # = crc32(bytes(list of bools))
        self._batches_emitted = 0
        self._desirable = _Stream(np.flatnonzero(flags), self.seed, "desirable")
        self._undesirable = _Stream(np.flatnonzero(~flags), self.seed, "undesirable")
        self._all = _Stream(np.arange(n), self.seed, "all")

    # -- batch composition ------------------------------------------------------------------

    def _desirable_before(self, b: int) -> int:
        """Desirable rows in global batches 0..b-1: round(b * G * nD / N), halves rounded up.

        Exact integer arithmetic, so every rank agrees. Batch b gets the difference of two
        consecutive values; each rounding is off by at most 1/2, so each batch's desirable count
        is floor or ceil of G * nD / N: within one row of the dataset ratio.
        """
        g, nd, n = self.global_batch_size, self._num_desirable, self._num_rows
        return (2 * b * g * nd + n) // (2 * n)

    def next_global_batch(self) -> list[int]:
        """The next global batch (len == global_batch_size): in balanced mode its desirable rows,
        then its undesirable rows, each in stream order."""
        g = self.global_batch_size
        if self.balanced:
            b = self._batches_emitted
            n_d = self._desirable_before(b + 1) - self._desirable_before(b)
            batch = self._desirable.take(n_d) + self._undesirable.take(g - n_d)
        else:
            batch = self._all.take(g)
        self._batches_emitted += 1
        return batch

    # -- progress and resume ----------------------------------------------------------------

    @property
    def batches_emitted(self) -> int:
        return self._batches_emitted

    @property
    def epoch(self) -> int:
        """Full passes over the dataset consumed: (rows handed out) // N.

        In balanced mode the two streams advance in the dataset's proportion (cumulative
        rounding), so this is also each stream's own pass count, give or take one row.
        """
        return self._batches_emitted * self.global_batch_size // self._num_rows

    def _params(self) -> dict[str, int]:
        return {
            "num_rows": self._num_rows,
            "num_desirable": self._num_desirable,
            "labels_crc32": self._labels_crc32,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "balanced": int(self.balanced),
        }

    def state_dict(self) -> dict[str, int]:
        """Plain ints: the parameters to validate against and the stream positions. No
        micro-batch layout: the global batches do not depend on it, so a run may resume on a
        different DP x grad-accum layout."""
        return {
            "version": _STATE_VERSION,
            **self._params(),
            "batches_emitted": self._batches_emitted,
            "desirable_consumed": self._desirable.position,
            "undesirable_consumed": self._undesirable.position,
            "all_consumed": self._all.position,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved sampler stopped; ValueError names any mismatch.

        Keys this version does not read (``num_micro_batches``, written by earlier versions) are
        ignored.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"sampler state version {state.get('version')!r} is not {_STATE_VERSION}"
            )
        for key, now in self._params().items():
            if key not in state:
                raise ValueError(f"sampler state has no {key!r}")
            if int(state[key]) != now:
                raise ValueError(
                    f"sampler state mismatch: {key} is {state[key]} in the checkpoint but {now} "
                    "now; resume with the same dataset, global batch size, seed and balanced flag"
                )
        b = int(state["batches_emitted"])
        if b < 0:
            raise ValueError(f"sampler state has batches_emitted = {b}")
        # The positions follow from b; a disagreement means a corrupted or hand-edited state.
        rows = b * self.global_batch_size
        n_d = self._desirable_before(b) if self.balanced else 0
        expected = {
            "desirable_consumed": n_d,
            "undesirable_consumed": rows - n_d if self.balanced else 0,
            "all_consumed": 0 if self.balanced else rows,
        }
        for key, value in expected.items():
            if int(state.get(key, -1)) != value:
                raise ValueError(
                    f"sampler state mismatch: {key} is {state.get(key)} but batches_emitted = {b} "
                    f"implies {value}"
                )
        self._batches_emitted = b
        self._desirable.position = expected["desirable_consumed"]
        self._undesirable.position = expected["undesirable_consumed"]
        self._all.position = expected["all_consumed"]
