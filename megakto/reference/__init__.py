"""Reference log-probs for a list of (prompt_ids, completion_ids) rows, end to end.

* ``scorers``: the common interface ``logps(pairs) -> (S,)`` and its two answers, a frozen engine
  run online (:class:`OnlineReference`) or a content-keyed cache (:class:`CachedReference`);
* ``fingerprint``: which reference weights a cache belongs to (:func:`reference_fingerprint`);
* ``store``: the cache on disk, keyed by :func:`sequence_key` (:class:`RefLogpCache`);
* ``precompute``: fill the cache's missing entries, sharded over the data-parallel ranks
  (``from megakto.reference.precompute import precompute``);
* ``build``: ``ref.mode`` -> a scorer, the one call the trainer makes (:func:`build_reference`).

``build`` loads engines (deepspeed) and talks to the other ranks, so it is imported explicitly
(``from megakto.reference.build import build_reference``); the names here are pure and light.
"""

from megakto.reference.fingerprint import reference_fingerprint
from megakto.reference.scorers import CachedReference, OnlineReference, Reference
from megakto.reference.store import RefLogpCache, sequence_key

__all__ = [
    "Reference",
    "OnlineReference",
    "CachedReference",
    "RefLogpCache",
    "sequence_key",
    "reference_fingerprint",
]
