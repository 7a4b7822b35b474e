"""A tokenized split held for training: labels and prompt keys as numpy arrays (9 bytes a row, 17
with per-row weights), token ids read from the memory-mapped Arrow table per batch, so a large
dataset is never copied into Python lists whole."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["TokenizedSplit"]


class TokenizedSplit:
    def __init__(self, ds):
        self.ds = ds
        cols = ds.select_columns(["label", "prompt_key"]).with_format("numpy")[:]
        self.label = np.asarray(cols["label"], dtype=bool)
        self.prompt_key = np.asarray(cols["prompt_key"], dtype=np.int64)
        # Per-row loss weights (data's ``weight`` column); None when the data has none.
        self.weight = (np.asarray(ds.select_columns(["weight"]).with_format("numpy")[:]["weight"], dtype=np.float64)
                       if "weight" in ds.column_names else None)
        self._ids = ds.select_columns(["prompt_ids", "completion_ids"])
        self._arrow = self._ids.with_format("arrow")

    def __len__(self) -> int:
        return len(self.label)

    def fetch(self, indices: Sequence[int]) -> dict[str, list]:
        """Columns of ``indices`` in that order: prompt_ids, completion_ids, label, prompt_key, and
        weight when the split has per-row weights."""
        indices = [int(i) for i in indices]
        picked = self._ids[indices]
        out = {"prompt_ids": picked["prompt_ids"], "completion_ids": picked["completion_ids"],
               "label": [bool(self.label[i]) for i in indices],
               "prompt_key": [int(self.prompt_key[i]) for i in indices]}
        if self.weight is not None:
            out["weight"] = [float(self.weight[i]) for i in indices]
        return out

    def class_weights(self) -> tuple[float, float]:
        """(W_D, W_U): the summed row weights of each class, the row counts when unweighted."""
        if self.weight is None:
            n_d = int(self.label.sum())
            return float(n_d), float(len(self) - n_d)
        return float(self.weight[self.label].sum()), float(self.weight[~self.label].sum())

    def id_arrays(self, column: str, rows: slice | Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of ``column`` for a slice or a list of rows as (offsets, values): row k's ids
        are ``values[offsets[k]:offsets[k + 1]]`` (int64), read straight from Arrow."""
        if not isinstance(rows, slice):
            rows = [int(i) for i in rows]
            if not rows:
                return np.zeros(1, dtype=np.int64), np.empty(0, dtype=np.int64)
        lists = self._arrow[rows][column].combine_chunks()
        offsets = np.asarray(lists.offsets, dtype=np.int64)
        values = np.asarray(lists.flatten(), dtype=np.int64)
        return offsets - offsets[0], values

    def column_lengths(self, column: str, chunk_rows: int = 65536) -> np.ndarray:
        """Tokens in each row's ``column`` (prompt_ids or completion_ids), in dataset order."""
        import pyarrow.compute as pc

        parts = [np.asarray(pc.list_value_length(self._arrow[a:a + chunk_rows][column]), dtype=np.int64)
                 for a in range(0, len(self), chunk_rows)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
