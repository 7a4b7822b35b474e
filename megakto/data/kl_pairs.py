"""Mismatched (prompt, completion) pairs for KTO's KL reference point.

KTO (Ethayarajh et al. 2024, eq. 7) measures each example's reward against a reference point
z_0 = KL(pi_theta(y'|x) || pi_ref(y'|x)), which in practice is estimated from the batch itself by
pairing each prompt x_i with a completion y_j written for a *different* prompt. This module picks
j ("the partner of i") for every example.

Why over the global batch rather than each micro-batch:

* TRL and most peers rotate by one position inside each device batch. With a micro-batch of one
  that pairs an example with itself, so the "KL" rows are the target rows and z_0 collapses onto
  the rewards it is meant to anchor.
* Paired preference data converted to KTO rows puts (x, y_w) and (x, y_l) next to each other, so a
  naive +1 rotation pairs rows that share a prompt: not mismatched at all.

Every rank holds the prompt keys of the whole global batch (the sampler hands out global batches),
so every rank computes the same partners from (prompt_keys, seed, step) with no communication.
A rank then only has to build the KL rows of its own micro-batches. The estimate of z_0 uses all
of the global batch's completions exactly once whenever a permutation exists, which it does as
long as no prompt fills more than half the batch.

With the reference cache (``ref.mode: cache``) the KL rows must be a fixed set, so each row's
partner is drawn once for the whole split instead (:func:`dataset_kl_partners`, with a fixed seed
so that runs with different seeds share one cache); :mod:`megakto.reference.sequences` builds
every target and KL row of a split from those partners.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np

from megakto.data.tokenize import fit_to_length
from megakto.errors import DataError

__all__ = ["kl_partners", "dataset_kl_partners", "fit_kl_row"]

# Fixed, so that runs with different seeds share one cache of KL-row log-probs.
DATASET_KL_SEED, DATASET_KL_STEP = 0, 0


def _rng(seed: int, step: int) -> random.Random:
    # A private generator seeded through sha256, never Python's hash() (salted per process) and
    # never the global RNG state (which other code may have advanced differently on each rank).
    digest = hashlib.sha256(f"megakto.kl_partners:{seed}:{step}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def kl_partners(prompt_keys: Sequence[int], *, seed: int, step: int) -> list[int]:
    """Return ``partner`` with ``prompt_keys[partner[i]] != prompt_keys[i]`` for every i.

    Example i's KL row is its own prompt followed by example ``partner[i]``'s completion.
    ``prompt_keys`` covers one global batch (all ranks, all micro-batches) in sampler order.

    When the largest same-prompt group holds at most half of the G examples, ``partner`` is a
    derangement of ``range(G)``: every completion is used by exactly one KL row. Otherwise no such
    permutation exists (the big group would need more foreign completions than there are), and
    each example gets an independent, seeded, uniformly random partner among the rows with a
    different prompt, so some completions are used more than once and some not at all.
    """
    return _partners(prompt_keys, seed=seed, step=step).tolist()


def _partners(prompt_keys: Sequence[int], *, seed: int, step: int) -> np.ndarray:
    """:func:`kl_partners` as an int64 array, vectorised with numpy: a whole split of a million
    rows takes seconds and ~50 bytes a row, where dicts of Python lists took ~30 s and ~220 MiB.
    The seeded draws are exactly those of the list version (tests/data/test_kl_pairs.py keeps it
    as the reference): each same-prompt block, in first-appearance order, is shuffled with the
    private generator (a block of one row draws nothing), then the order of the blocks."""
    keys = np.asarray(prompt_keys, dtype=np.int64).reshape(-1)
    g = len(keys)
    if g == 0:
        raise ValueError(f"kl_partners got an empty global batch at step {step}")
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    if len(counts) < 2:
        raise DataError(
            f"all {g} examples of the global batch at step {step} share one prompt; KTO's KL "
            "reference point needs mismatched (prompt, completion) pairs: shuffle or add prompts, "
            "or use kto.loss_type=apo_zero_unpaired"
        )
    rng = _rng(seed, step)
    # Blocks in first-appearance order, so the result depends only on the inputs; each block's
    # rows in index order, as they were appended.
    by_appearance = np.argsort(first, kind="stable")
    block_of = np.empty_like(by_appearance)
    block_of[by_appearance] = np.arange(len(by_appearance))
    members = np.argsort(block_of[inverse.reshape(-1)], kind="stable")
    sizes = counts[by_appearance]
    starts = np.cumsum(sizes) - sizes
    multi = sizes > 1
    if multi.any():
        rows = members.tolist()  # list slices: ~10x faster than numpy's for blocks of two
        for start, size in zip(starts[multi].tolist(), sizes[multi].tolist()):
            block = rows[start:start + size]
            rng.shuffle(block)
            rows[start:start + size] = block
        members = np.asarray(rows, dtype=np.int64)
    order = list(range(len(sizes)))
    rng.shuffle(order)  # the same draws as shuffling the list of blocks: shuffle sees only the length
    order = np.asarray(order, dtype=np.int64)
    # s: the blocks laid out one after another in shuffled order.
    laid = sizes[order]
    s = members[np.repeat(starts[order] - (np.cumsum(laid) - laid), laid) + np.arange(g)]
    largest = int(sizes.max())
    partner = np.empty(g, dtype=np.int64)

    if 2 * largest <= g:
        # Lay the groups out as contiguous blocks in one list s and send s[k] -> s[(k + m) % G],
        # m = largest group size. A shift is a bijection on positions, so this is a permutation.
        # No element lands in its own block: take a block of size a at positions [p, p + a) and
        # k in it, so 0 <= k - p < a <= m.
        #   * no wrap (k + m < G): k + m >= p + m >= p + a, i.e. past the end of the block;
        #   * wrap (k + m >= G): the target k + m - G < p  <=>  k - p < G - m, which holds since
        #     k - p < a <= m <= G - m (because 2m <= G); so the target lies before the block.
        # The proof needs only a <= m <= G/2, not any particular block order, so the block order
        # stays random (more varied pairs across steps than largest-first).
        partner[s] = s[(np.arange(g) + largest) % g]
        return partner

    # Fallback: one prompt holds more than half of the batch. Draw each partner uniformly from
    # the rows outside the example's own block in O(1): index the other G - a rows by skipping
    # over the block [p, p + a) in the laid-out list.
    p = 0
    for a in laid.tolist():
        for i in s[p:p + a].tolist():
            r = rng.randrange(g - a)
            partner[i] = s[r] if r < p else s[r + a]
        p += a
    return partner


def dataset_kl_partners(prompt_keys: Sequence[int]) -> np.ndarray:
    """One mismatched partner per row of a whole split, the same in every run (int64 array: 8
    bytes a row, where a list of Python ints would take 36)."""
    return _partners(prompt_keys, seed=DATASET_KL_SEED, step=DATASET_KL_STEP)


def fit_kl_row(prompt_ids, completion_ids, max_length: int, max_prompt_length: int):
    """Prompt i with completion j, cut to ``max_length`` the same way target rows are."""
    fitted = fit_to_length(prompt_ids, completion_ids, max_length, max_prompt_length)
    assert fitted is not None, "max_prompt_length < max_length always leaves room for a completion token"
    return fitted

