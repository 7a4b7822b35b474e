"""Input embedding and output head split into row blocks of the vocabulary.

With a 128k-256k vocabulary the two (V, H) matrices dominate what a training step allocates beyond
its persistent state, not through logits (the chunked log-probs never build them) but through
whole-matrix temporaries: autograd produces each matrix's full gradient before ZeRO reduces and
partitions it, ZeRO-3 gathers the full matrix for every forward and backward, and the optimizer step
copies a whole parameter group's gradients (and takes float64 norms of whole parameters). Each of
those is as large as the largest parameter, so here no parameter is vocabulary-sized: the matrix
becomes blocks of ``rows`` rows, each its own parameter in its own submodule, and every temporary
is at most one block, whatever V is.

* :class:`BlockedEmbedding` replaces ``nn.Embedding``: each block looks up the ids it owns.
* :class:`BlockedHead` replaces the bias-free output ``nn.Linear``: its forward returns ordinary
  logits (the ``model.logps=full`` path); :func:`blocked_token_logps` gives the chunked log-probs,
  block by block, combined as a log-sum-exp. Each block is a separate autograd node, so its weight
  gradient is handed to the engine (and freed) before the next block's is computed.
* Tied embeddings stay tied: the head holds the embedding's very blocks.

Every block is called on every forward, whether or not the batch uses its ids, so that ZeRO-3's
per-module gathers are the same collective sequence on every rank.

Checkpoints of a blocked model name the parameters ``<module>.vocab_blocks.<k>.weight``;
:func:`merge_vocab_blocks` turns them back into the Hugging Face names. This module is pure torch;
:func:`megakto.distributed.engine.block_vocab` swaps the modules in, under ZeRO-3 too.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megakto.kto.chunked_logps import local_targets, shard_stats

__all__ = ["VocabBlock", "BlockedEmbedding", "BlockedHead", "blocked_token_logps", "block_sizes",
           "auto_block_rows", "resolve_block_rows", "merge_vocab_blocks", "vocab_layout", "BLOCKS"]

BLOCKS = "vocab_blocks"  # the ModuleList's attribute name, part of every block parameter's name

# Default block: 2^22 elements (16 MiB in fp32), so each temporary named above is at most that.
AUTO_BLOCK_ELEMENTS = 1 << 22


def auto_block_rows(hidden_size: int) -> int:
    return max(1, AUTO_BLOCK_ELEMENTS // max(1, hidden_size))


def resolve_block_rows(setting: int | str, vocab_size: int, hidden_size: int) -> int:
    """Rows per block for ``model.vocab_block_rows`` (``auto``, or an int; 0 = off) and a (V, H)
    matrix; 0 when the vocabulary fits in one block (nothing to split)."""
    rows = auto_block_rows(hidden_size) if setting == "auto" else int(setting)
    return rows if 0 < rows < vocab_size else 0


def block_sizes(vocab_size: int, rows: int) -> list[int]:
    """Rows per block: ``rows`` each, the last one shorter."""
    if rows < 1:
        raise ValueError(f"block rows must be >= 1; got {rows}")
    return [min(rows, vocab_size - s) for s in range(0, vocab_size, rows)]


class VocabBlock(nn.Module):
    """Rows ``[start, start + weight.shape[0])`` of a vocabulary matrix. ``block(fn, *args)`` calls
    ``fn(self.weight, *args)`` inside the module call, where ZeRO-3 has gathered the weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, fn: Callable, *args):
        return fn(self.weight, *args)


def _blocks(weight: torch.Tensor, sizes: list[int], place) -> nn.ModuleList:
    """One :class:`VocabBlock` per row range, each a copy; ``place(block)`` runs on each as soon as
    it exists (ZeRO-3 partitions it there), so at most one block's copy is whole at a time."""
    blocks = nn.ModuleList()
    for w in weight.detach().split(sizes):
        block = VocabBlock(w.clone())
        if place is not None:
            place(block)
        blocks.append(block)
    return blocks


class _Blocked(nn.Module):
    def __init__(self, blocks: nn.ModuleList, sizes: list[int]):
        super().__init__()
        setattr(self, BLOCKS, blocks)
        # Kept apart from the weights: under ZeRO-3 a partitioned weight's .shape is empty.
        self.sizes = list(sizes)
        self.starts = [sum(sizes[:k]) for k in range(len(sizes))]
        self.vocab_size = sum(sizes)

    def ranges(self):
        """(start, rows, block) for every block, in vocabulary order."""
        return zip(self.starts, self.sizes, getattr(self, BLOCKS))


class BlockedEmbedding(_Blocked):
    """``nn.Embedding`` (no max_norm) over row blocks. ``padding_idx`` keeps its zero gradient."""

    def __init__(self, blocks: nn.ModuleList, sizes: list[int], padding_idx: int | None = None):
        super().__init__(blocks, sizes)
        self.padding_idx = padding_idx

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rows: int, padding_idx: int | None = None,
                    place: Callable[[nn.Module], None] | None = None) -> "BlockedEmbedding":
        sizes = block_sizes(weight.shape[0], rows)
        return cls(_blocks(weight, sizes, place), sizes, padding_idx)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        n_blocks, rows = len(self.sizes), self.sizes[0]  # every block but the last has `rows` rows
        valid = (flat >= 0) & (flat < self.vocab_size)
        block_of = torch.where(valid, torch.div(flat, rows, rounding_mode="floor"), n_blocks)
        order = torch.argsort(block_of, stable=True)
        # The one host sync: how many ids each block looks up (the last bucket counts bad ids).
        counts = torch.bincount(block_of, minlength=n_blocks + 1).tolist()
        if counts[-1]:
            bad = flat[~valid]
            raise IndexError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})")
        ids = flat[order]
        pieces, offset = [], 0
        for (start, size, block), count in zip(self.ranges(), counts):
            pad = self.padding_idx - start if self.padding_idx is not None and 0 <= self.padding_idx - start < size \
                else None
            local = ids[offset:offset + count] - start
            pieces.append(block(lambda w, i, p=pad: F.embedding(i, w, padding_idx=p), local))
            offset += count
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = torch.cat(pieces).index_select(0, inverse)
        return out.view(*input_ids.shape, out.shape[-1])


class BlockedHead(_Blocked):
    """A bias-free output projection over row blocks (possibly the embedding's own blocks)."""

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rows: int,
                    place: Callable[[nn.Module], None] | None = None) -> "BlockedHead":
        sizes = block_sizes(weight.shape[0], rows)
        return cls(_blocks(weight, sizes, place), sizes)

    @classmethod
    def tied_to(cls, embedding: BlockedEmbedding) -> "BlockedHead":
        return cls(getattr(embedding, BLOCKS), embedding.sizes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        wide = _wide(hidden)
        return torch.cat([block(lambda w, h: F.linear(h.to(w.dtype), w), wide) for block in getattr(self, BLOCKS)],
                         dim=-1)


def _wide(hidden: torch.Tensor) -> torch.Tensor:
    """Half-precision hidden states as fp32 (exact; each block's chunked matmul is fp32 anyway, see
    :mod:`megakto.kto.chunked_logps`), so the blocks' hidden gradients are summed in fp32 and
    rounded to the model's dtype once, as the whole-matrix kernel does. The ``full`` path's blocks
    cast back and give the model's own logits, as ``nn.Linear`` would."""
    return hidden.float() if hidden.dtype in (torch.bfloat16, torch.float16) else hidden


def blocked_token_logps(head: BlockedHead, hidden: torch.Tensor, targets: torch.Tensor,
                        chunk_tokens: Callable[[int], int]) -> torch.Tensor:
    """(N,) log softmax(hidden @ W.T)[targets] over the full vocabulary, block by block:
    log-normaliser = log-sum-exp of the blocks' log-sum-exps; ``chunk_tokens(rows)`` gives the
    tokens per (chunk, rows) logits block."""
    lse, target = [], []
    hidden = _wide(hidden)
    for start, rows, block in head.ranges():
        local_t = local_targets(targets, start, rows)
        b_lse, b_target = block(lambda w, h, t, c: shard_stats(h, w, t, c), hidden, local_t, chunk_tokens(rows))
        lse.append(b_lse)
        target.append(b_target)
    return torch.stack(target).sum(0) - torch.logsumexp(torch.stack(lse), dim=0)


def vocab_layout(model: nn.Module) -> list[int]:
    """Rows per block of the model's input embedding; [] when it is not split. A checkpoint only
    loads into a model with the same layout (its parameters are named per block). A pipeline module
    (no ``get_input_embeddings``) never splits them."""
    if not hasattr(model, "get_input_embeddings"):
        return []
    emb = model.get_input_embeddings()
    return list(emb.sizes) if isinstance(emb, BlockedEmbedding) else []


_BLOCK_KEY = re.compile(rf"^(?P<prefix>.*)\.{BLOCKS}\.(?P<k>\d+)\.weight$")


def merge_vocab_blocks(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names again: ``<m>.vocab_blocks.<k>.weight`` -> ``<m>.weight`` (the blocks
    concatenated in order). Other entries pass through. Raises on a gap in a module's blocks."""
    out, groups = {}, {}
    for name, tensor in state_dict.items():
        match = _BLOCK_KEY.match(name)
        if match is None:
            out[name] = tensor
        else:
            groups.setdefault(match["prefix"], {})[int(match["k"])] = tensor
    for prefix, blocks in groups.items():
        if sorted(blocks) != list(range(len(blocks))):
            raise ValueError(f"{prefix}.{BLOCKS}: blocks {sorted(blocks)} are not 0..{len(blocks) - 1}")
        out[f"{prefix}.weight"] = torch.cat([blocks[k] for k in range(len(blocks))])
    return out
