"""Content-keyed store of reference log-probs (``ref.mode: cache``).

KTO's implied reward is beta * log(pi_theta(y|x) / pi_ref(y|x)) and its reference point is the
same log-ratio on mismatched pairs (Ethayarajh et al. 2024, eq. 7). pi_ref is frozen, so the
reference log-prob of a given token sequence never changes: computed once, it can be read back on
every later step, epoch and run. That takes the two reference forwards (target and KL rows) out of
every step and lets training run without the reference model in memory.

**Keys are content, not row numbers.** A key is blake2b over (prompt length, prompt ids,
completion ids), so the cache does not care about sampling order, reshuffles, seeds or which run
filled it (HALOs keys by token tuple; TRL's row-indexed cache forces a fixed order). The prompt
length is part of the key because log pi(y|x) sums over completion tokens only: the same ids split
at a different point are a different quantity.

**Layout** of ``cache_dir``: ``meta.json`` ({"fingerprint", "format": 1, "created"}, the
fingerprint from :mod:`megakto.reference.fingerprint`) and shards
``shard-<writer>-<n>.safetensors`` with ``keys`` (uint8, (N, 16)) and ``logps`` (float64, (N,)),
the fingerprint repeated in the shard metadata. Safetensors only: reading a cache never unpickles.
A shard is written to a temporary name and published with a no-clobber hard link (``os.replace``
where the file system has no links), so a reader sees whole shards or none. A key that is missing
raises: there is no silent fallback to another model (TRL #6443 used the trained policy as the
reference that way).

This module never talks to ``torch.distributed``: after the other ranks have written their shards
and a barrier, each rank calls :meth:`RefLogpCache.reload`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from megakto.errors import MegaktoError

__all__ = ["RefLogpCache", "sequence_key"]

FORMAT = 1
KEY_BYTES = 16
_SHARD = re.compile(r"shard-([A-Za-z0-9_.-]+)-(\d+)\.safetensors")
_WRITER = re.compile(r"[A-Za-z0-9_.-]+")


def sequence_key(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> bytes:
    """16-byte blake2b of (prompt length, completion length, prompt ids, completion ids).

    Ids are hashed as little-endian int64 whatever the input type (list, int32 Arrow column, int64
    tensor), so equal content gives the same key everywhere.
    """
    p = np.ascontiguousarray(prompt_ids, dtype="<i8")
    c = np.ascontiguousarray(completion_ids, dtype="<i8")
    if p.ndim != 1 or c.ndim != 1:
        raise ValueError(f"sequence_key takes 1-D id lists, got shapes {p.shape} and {c.shape}")
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"megakto.refkey1")
    h.update(struct.pack("<qq", p.size, c.size))
    h.update(p.tobytes())
    h.update(c.tobytes())
    return h.digest()


def _as_keys(keys: Iterable[bytes] | np.ndarray) -> np.ndarray:
    if isinstance(keys, np.ndarray) and keys.dtype == np.dtype(f"S{KEY_BYTES}"):
        return keys  # already fixed-width keys (megakto.reference.sequences): no Python bytes objects
    keys = [bytes(k) for k in keys]
    bad = next((i for i, k in enumerate(keys) if len(k) != KEY_BYTES), None)
    if bad is not None:
        raise ValueError(f"key {bad} has {len(keys[bad])} bytes; keys come from sequence_key ({KEY_BYTES})")
    # Fixed-width byte strings: every key is exactly 16 bytes, so numpy's ordering is a total
    # order on keys and sort/searchsorted work on them directly.
    return np.frombuffer(b"".join(keys), dtype=f"S{KEY_BYTES}")


# ---------------------------------------------------------------------------------- cache

class RefLogpCache:
    """Reference log-probs by :func:`sequence_key`, held in memory as one sorted array."""

    def __init__(self, cache_dir: str, fingerprint: str, *, tolerance: float = 1e-6):
        self.cache_dir = cache_dir
        self.fingerprint = fingerprint
        self.tolerance = tolerance
        self._keys = np.empty(0, dtype=f"S{KEY_BYTES}")
        self._logps = np.empty(0, dtype=np.float64)

    @classmethod
    def open(cls, cache_dir: str, fingerprint: str, *, create: bool,
             tolerance: float = 1e-6) -> "RefLogpCache":
        """Open (or with ``create`` start) the cache for ``fingerprint`` and read its shards."""
        meta_path = os.path.join(cache_dir, "meta.json")
        if not os.path.isfile(meta_path):
            if not create:
                raise MegaktoError(f"ref.cache_dir={cache_dir}: no reference log-prob cache there "
                                   f"(no meta.json)")
            os.makedirs(cache_dir, exist_ok=True)
            meta = {"fingerprint": fingerprint, "format": FORMAT,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            # No clobber: if another process created it first, its meta.json is checked below.
            _publish(cache_dir, json.dumps(meta, indent=1).encode(), "meta.json", [meta_path])
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            found, fmt = meta["fingerprint"], meta["format"]
        except (ValueError, KeyError, TypeError) as err:
            raise MegaktoError(f"ref.cache_dir={cache_dir}: meta.json is unreadable ({err}); delete "
                               f"the folder or point ref.cache_dir elsewhere") from None
        if fmt != FORMAT:
            raise MegaktoError(f"ref.cache_dir={cache_dir}: cache format {fmt}, this version reads "
                               f"format {FORMAT}; delete the folder or point ref.cache_dir elsewhere")
        if found != fingerprint:
            raise MegaktoError(f"ref.cache_dir={cache_dir} holds log-probs of reference weights with "
                               f"fingerprint {found[:12]}, but the reference now has fingerprint "
                               f"{fingerprint[:12]}: delete {cache_dir} or point ref.cache_dir elsewhere")
        cache = cls(cache_dir, fingerprint, tolerance=tolerance)
        cache.reload()
        return cache

    def __len__(self) -> int:
        return len(self._keys)

    def _find(self, keys: Iterable[bytes]) -> np.ndarray:
        """Index into the sorted arrays for every key, -1 where absent."""
        q = _as_keys(keys)
        if len(self._keys) == 0:
            return np.full(len(q), -1, dtype=np.int64)
        idx = np.minimum(np.searchsorted(self._keys, q), len(self._keys) - 1)
        return np.where(self._keys[idx] == q, idx, -1)

    def missing(self, keys: Iterable[bytes] | np.ndarray) -> np.ndarray:
        """Positions in ``keys`` that the cache does not hold (int64, ascending)."""
        return np.flatnonzero(self._find(keys) < 0)

    def lookup(self, keys: Iterable[bytes]) -> torch.Tensor:
        """float64 log-probs in the order of ``keys``; raises if any key is absent."""
        pos = self._find(keys)
        absent = np.flatnonzero(pos < 0)
        if len(absent):
            raise MegaktoError(f"ref.cache_dir={self.cache_dir}: {len(absent)} of {len(pos)} sequences "
                               f"have no cached reference log-prob (first at position {absent[0]}); "
                               f"the cache must be rebuilt: rerun the precompute pass or delete the folder")
        return torch.from_numpy(self._logps[pos])

    def write_shard(self, keys: Sequence[bytes], logps, writer: str) -> str | None:
        """Publish one shard atomically; returns its path (None when there is nothing to write).

        The values become visible to lookups after :meth:`reload` (on this and every process).
        """
        if not _WRITER.fullmatch(writer):
            raise ValueError(f"writer={writer!r}: use letters, digits, '_', '.', '-'")
        k = _as_keys(keys)
        v = np.asarray(torch.as_tensor(logps).detach().cpu().to(torch.float64)).reshape(-1)
        if len(v) != len(k):
            raise ValueError(f"{len(k)} keys but {len(v)} log-probs")
        if not np.isfinite(v).all():
            raise MegaktoError(f"reference log-probs for ref.cache_dir={self.cache_dir}: "
                               f"{int((~np.isfinite(v)).sum())} of {len(v)} are not finite; nothing written")
        if len(k) == 0:
            return None
        tensors = {"keys": np.frombuffer(k.tobytes(), dtype=np.uint8).reshape(-1, KEY_BYTES).copy(),
                   "logps": np.ascontiguousarray(v)}
        tmp = os.path.join(self.cache_dir, f".tmp-{writer}-{os.getpid()}-{uuid.uuid4().hex}")
        save_file(tensors, tmp, metadata={"fingerprint": self.fingerprint, "format": str(FORMAT)})
        taken = [int(m.group(2)) for m in map(_SHARD.fullmatch, os.listdir(self.cache_dir))
                 if m and m.group(1) == writer]
        n = max(taken, default=-1) + 1
        names = (f"shard-{writer}-{i}.safetensors" for i in range(n, n + 10_000))
        return _publish(self.cache_dir, None, tmp, (os.path.join(self.cache_dir, x) for x in names))

    def reload(self) -> None:
        """Read every shard in ``cache_dir`` (e.g. after the other ranks wrote theirs and a barrier)."""
        names = sorted(x for x in os.listdir(self.cache_dir) if _SHARD.fullmatch(x))
        keys, logps, source = [], [], []
        for i, name in enumerate(names):
            k, v = self._read_shard(os.path.join(self.cache_dir, name))
            keys.append(k)
            logps.append(v)
            source.append(np.full(len(k), i, dtype=np.int64))
        if not names:
            self._keys, self._logps = np.empty(0, dtype=f"S{KEY_BYTES}"), np.empty(0, dtype=np.float64)
            return
        k, v, s = np.concatenate(keys), np.concatenate(logps), np.concatenate(source)
        order = np.argsort(k, kind="stable")  # stable: among duplicates the first shard wins
        k, v, s = k[order], v[order], s[order]
        dup = np.flatnonzero(k[1:] == k[:-1])
        if len(dup):
            diff = np.abs(v[dup + 1] - v[dup])
            worst = int(np.argmax(diff))
            if diff[worst] > self.tolerance:
                j = dup[worst]
                raise MegaktoError(f"ref.cache_dir={self.cache_dir}: corrupt cache: {names[s[j]]} and "
                                   f"{names[s[j + 1]]} disagree on a sequence by {diff[worst]:.3g} "
                                   f"(> {self.tolerance:g}); delete the folder and rebuild (runs filling "
                                   f"one cache at the same time can cause this)")
            keep = np.ones(len(k), dtype=bool)
            keep[dup + 1] = False
            k, v = k[keep], v[keep]
        self._keys, self._logps = k, v

    def _read_shard(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        def corrupt(why: str) -> MegaktoError:
            return MegaktoError(f"{path}: bad reference-cache shard ({why}); delete it or the whole "
                                f"ref.cache_dir")

        try:
            with safe_open(path, framework="np") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                if names != {"keys", "logps"}:
                    raise corrupt(f"tensors {sorted(names)}, expected ['keys', 'logps']")
                k, v = f.get_tensor("keys"), f.get_tensor("logps")
        except (SafetensorError, OSError) as err:
            raise corrupt(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
        if meta.get("fingerprint") != self.fingerprint:
            raise corrupt(f"written for reference {str(meta.get('fingerprint'))[:12]}, "
                          f"cache is {self.fingerprint[:12]}")
        if k.dtype != np.uint8 or k.ndim != 2 or k.shape[1] != KEY_BYTES:
            raise corrupt(f"keys {k.dtype} {k.shape}, expected uint8 (N, {KEY_BYTES})")
        if v.dtype != np.float64 or v.shape != (k.shape[0],):
            raise corrupt(f"logps {v.dtype} {v.shape}, expected float64 ({k.shape[0]},)")
        if not np.isfinite(v).all():
            raise corrupt("non-finite log-probs")
        return np.ascontiguousarray(k).view(f"S{KEY_BYTES}").reshape(-1), v


def _publish(folder: str, data: bytes | None, tmp_or_name: str, targets: Iterable[str]) -> str | None:
    """Give a finished temporary file its final name without overwriting anything.

    With ``data``, the temporary file is written here first. Returns the target used, or None when
    every target already exists (meta.json created by someone else).
    """
    if data is not None:
        tmp = os.path.join(folder, f".tmp-{tmp_or_name}-{os.getpid()}-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
    else:
        tmp = tmp_or_name
    try:
        for target in targets:
            try:
                os.link(tmp, target)  # fails if target exists: never clobbers a published file
                return target
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links: best-effort check, then rename
                if os.path.exists(target):
                    continue
                os.replace(tmp, target)
                return target
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
