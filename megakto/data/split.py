"""A tokenized split held for training: labels and prompt keys in memory, token ids fetched per
batch from the Arrow table (so a large dataset is never copied into Python lists whole)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["TokenizedSplit"]


class TokenizedSplit:
    def __init__(self, ds):
        self.ds = ds
        self.label = [bool(x) for x in ds["label"]]
        self.prompt_key = [int(x) for x in ds["prompt_key"]]
        self._ids = ds.select_columns(["prompt_ids", "completion_ids"])

    def __len__(self) -> int:
        return len(self.label)

    def fetch(self, indices: Sequence[int]) -> dict[str, list]:
        """Columns of ``indices`` in that order: prompt_ids, completion_ids, label, prompt_key."""
        picked = self._ids[list(indices)]
        return {"prompt_ids": picked["prompt_ids"], "completion_ids": picked["completion_ids"],
                "label": [self.label[i] for i in indices], "prompt_key": [self.prompt_key[i] for i in indices]}
