"""Every sequence a run asks the reference for, as keys and lengths, with token ids read on demand.

KTO scores two kinds of sequence with the reference (Ethayarajh et al. 2024, eq. 7): each row's
target (prompt_i, completion_i), for the implied reward, and, with a KL term, each row's KL row
(prompt_i, completion_j) with j its fixed mismatched partner, for the reference point z_ref. With
``ref.mode=cache`` every one of them is looked up by content (:func:`~megakto.reference.store.sequence_key`),
so the cache needs the key of every sequence of the run, and the precompute needs the token ids of
the ones it lacks.

A split of a million rows of 500 tokens holds 10^9 token ids; as Python lists that is tens of GiB
on every rank. Here a split's sequences are two numpy arrays instead: ``keys`` (16 bytes each) and
``lengths`` (int32), about 20 bytes a sequence, computed by walking the Arrow table in chunks; the
token ids stay in the memory-mapped table (keys are computed on first use: the online reference
never needs them), and :meth:`Sequences.fetch` reads just the rows asked
for (one Arrow ``take`` per call), so the precompute and the evaluator read only their own share.

Positions: a :class:`SplitSequences` of ``n`` rows has the targets at 0..n-1 and, with partners,
the KL rows at n..2n-1 (row ``i``'s at ``n + i``). :class:`ConcatSequences` puts several one after
the other (train, then eval). :class:`PairSequences` holds a plain list (tests, small sets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from megakto.data.kl_pairs import fit_kl_row
from megakto.data.tokenize import fitted_lengths
from megakto.reference.store import KEY_BYTES, sequence_key

__all__ = ["Sequences", "PairSequences", "SplitSequences", "ConcatSequences"]

Pair = tuple[list[int], list[int]]
_KEY = f"S{KEY_BYTES}"
CHUNK_ROWS = 8192  # rows read from the Arrow table at a time while computing keys


class Sequences:
    """``keys`` (numpy ``S16``), ``lengths`` (numpy int32, prompt + completion tokens) and
    :meth:`fetch`, over ``len(self)`` sequences in a fixed order."""

    keys: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def fetch(self, positions: Sequence[int]) -> list[Pair]:
        """(prompt_ids, completion_ids) of each position, in that order."""
        raise NotImplementedError

    def fill_keys(self, shard: int = 0, shards: int = 1, gather: Callable[[object], list] | None = None) -> None:
        """Compute ``keys`` and ``lengths`` (this rank ``shard`` of ``shards``, the rest through
        ``gather``); sequences held in memory have theirs already."""


class PairSequences(Sequences):
    """A list of (prompt_ids, completion_ids) held in memory."""

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]):
        self.pairs = [(list(p), list(c)) for p, c in pairs]
        self.keys = np.array([sequence_key(p, c) for p, c in self.pairs], dtype=_KEY)
        self.lengths = np.array([len(p) + len(c) for p, c in self.pairs], dtype=np.int32)

    def fetch(self, positions: Sequence[int]) -> list[Pair]:
        return [self.pairs[int(i)] for i in positions]


class SplitSequences(Sequences):
    """A :class:`~megakto.data.split.TokenizedSplit`'s targets and, given one partner per row,
    its KL rows (prompt i with partner[i]'s completion, cut as :func:`fit_kl_row` cuts it)."""

    def __init__(self, split, partners: Sequence[int] | np.ndarray | None, *, max_length: int,
                 max_prompt_length: int, chunk_rows: int = CHUNK_ROWS):
        self.split = split
        self.n_rows = len(split)
        self.partners = None if partners is None else np.asarray(partners, dtype=np.int64)
        if self.partners is not None and self.partners.shape != (self.n_rows,):
            raise ValueError(f"{len(self.partners)} partners for {self.n_rows} rows")
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.chunk_rows = chunk_rows
        self._keys = self._lengths = None

    def __len__(self) -> int:
        return self.n_rows * (1 if self.partners is None else 2)

    @property
    def has_kl(self) -> bool:
        return self.partners is not None

    @property
    def keys(self) -> np.ndarray:
        """Computed on first use (one pass over the split) unless :meth:`fill_keys` ran: only the
        reference cache needs them."""
        if self._keys is None:
            self.fill_keys()
        return self._keys

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self.fill_keys()
        return self._lengths

    def fill_keys(self, shard: int = 0, shards: int = 1, gather: Callable[[object], list] | None = None) -> None:
        """Compute keys and lengths for rows ``[n·shard/shards, n·(shard+1)/shards)`` and, with
        ``gather`` (every shard's object in shard order, e.g. an all-gather over the data-parallel
        group), assemble the whole arrays from all shards: each rank hashes 1/shards of the split."""
        lo, hi = self.n_rows * shard // shards, self.n_rows * (shard + 1) // shards
        mine = self._walk(lo, hi)
        pieces = [mine] if gather is None else gather(mine)
        if sum(len(piece[0]) for piece in pieces) != self.n_rows:
            raise ValueError(f"the shards hold {sum(len(piece[0]) for piece in pieces)} rows, the split {self.n_rows}")
        kinds = range(len(mine) // 2)  # targets, then KL rows
        self._keys = np.concatenate([piece[2 * k] for k in kinds for piece in pieces])
        self._lengths = np.concatenate([piece[2 * k + 1] for k in kinds for piece in pieces])

    def _walk(self, lo: int, hi: int) -> tuple[np.ndarray, ...]:
        """(target keys, target lengths[, KL keys, KL lengths]) of rows lo..hi-1, read in chunks."""
        out: list[np.ndarray] = []
        for _ in range(2 if self.has_kl else 1):
            out += [np.empty(hi - lo, dtype=_KEY), np.empty(hi - lo, dtype=np.int32)]
        for start in range(lo, hi, self.chunk_rows):
            self._fill(out, start - lo, start, min(start + self.chunk_rows, hi))
        return tuple(out)

    def _fill(self, out: list[np.ndarray], at: int, start: int, stop: int) -> None:
        p_off, p_val = self.split.id_arrays("prompt_ids", slice(start, stop))
        c_off, c_val = self.split.id_arrays("completion_ids", slice(start, stop))
        for i in range(stop - start):
            p, c = p_val[p_off[i]:p_off[i + 1]], c_val[c_off[i]:c_off[i + 1]]
            out[0][at + i] = sequence_key(p, c)
            out[1][at + i] = len(p) + len(c)
        if self.partners is None:
            return
        k_off, k_val = self.split.id_arrays("completion_ids", self.partners[start:stop])
        for i in range(stop - start):
            p, c = p_val[p_off[i]:p_off[i + 1]], k_val[k_off[i]:k_off[i + 1]]
            keep_p, keep_c = fitted_lengths(len(p), len(c), self.max_length, self.max_prompt_length)
            out[2][at + i] = sequence_key(p[len(p) - keep_p:], c[:keep_c])
            out[3][at + i] = keep_p + keep_c

    def fetch(self, positions: Sequence[int]) -> list[Pair]:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions outside 0..{len(self) - 1}")
        n = self.n_rows
        rows = np.where(positions < n, positions, positions - n)
        kl = positions >= n
        picked = self.split.fetch(rows.tolist())
        partner = (self.split.fetch(self.partners[rows[kl]].tolist())["completion_ids"] if kl.any() else [])
        out, j = [], 0
        for p, c, is_kl in zip(picked["prompt_ids"], picked["completion_ids"], kl):
            if is_kl:
                p, c = fit_kl_row(p, partner[j], self.max_length, self.max_prompt_length)
                j += 1
            out.append((list(p), list(c)))
        return out


class ConcatSequences(Sequences):
    """Several :class:`Sequences` one after the other."""

    def __init__(self, parts: Sequence[Sequences]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self._keys = self._lengths = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def fill_keys(self, shard: int = 0, shards: int = 1, gather: Callable[[object], list] | None = None) -> None:
        """:meth:`Sequences.fill_keys` for every part."""
        for part in self.parts:
            part.fill_keys(shard, shards, gather)
        self._keys = self._lengths = None

    @property
    def keys(self) -> np.ndarray:
        if self._keys is None:
            self._keys = (np.concatenate([p.keys for p in self.parts]) if self.parts
                          else np.empty(0, dtype=_KEY))
        return self._keys

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = (np.concatenate([p.lengths for p in self.parts]) if self.parts
                             else np.empty(0, dtype=np.int32))
        return self._lengths

    def fetch(self, positions: Sequence[int]) -> list[Pair]:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        part = np.searchsorted(self.starts, positions, side="right") - 1
        out: list[Pair | None] = [None] * len(positions)
        for k in np.unique(part):
            where = np.flatnonzero(part == k)
            for w, pair in zip(where, self.parts[k].fetch(positions[where] - self.starts[k])):
                out[w] = pair
        return out
