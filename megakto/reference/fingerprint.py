"""Which reference weights cached log-probs belong to, identified without loading the model.

:func:`reference_fingerprint` hashes (sha256), in this order: a scheme tag and whether hashing is
sampled or full; ``settings`` (e.g. dtype, attention kernel: a bf16 reference gives different
log-probs from an fp32 one) as sorted JSON; the bytes of ``config.json``; then, for every weight
file (top-level ``*.safetensors``; ``*.bin``/``*.pt`` only when there is no safetensors file) in
name order: its name, its size, the whole safetensors header (tensor names, dtypes, shapes, data
offsets, metadata), and the tensor bytes at the first 64 KiB, the last 64 KiB and 64 KiB every
64 MiB (about 1/1000 of the data: a 60 GB model reads ~60 MB). A change of weights confined to
unsampled bytes (same names, shapes, dtypes and file sizes) is NOT detected in that mode; fine-tuned
weights differ almost everywhere, so the sample sees them, but a hand-edit of a few values may not
be seen. ``full=True`` hashes every byte instead (minutes for a large model) and gives a different
fingerprint from the sampled mode. Tokenizer files are not covered: keys are token ids, so a
different tokenizer just produces different keys. The folder's path is not covered: a copy
elsewhere has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping

from megakto.errors import ConfigError, ModelError

__all__ = ["reference_fingerprint"]

_SAMPLE = 64 << 10   # bytes read at each sampled position
_STRIDE = 64 << 20   # distance between sampled positions
_BLOCK = 8 << 20     # read size when hashing everything


def reference_fingerprint(model_dir: str, *, full: bool = False,
                          settings: Mapping[str, object] | None = None) -> str:
    """sha256 (hex) of a local reference folder's config and weights; see the module docstring."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"ref.path={model_dir} is not a local folder: ref.mode=cache needs a local "
                          f"model folder to fingerprint the reference weights (download it first)")
    config = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config):
        raise ModelError(f"ref.path={model_dir}: folder has no config.json")
    h = hashlib.sha256()
    _field(h, b"megakto.reference_fingerprint.v1:" + (b"full" if full else b"sampled"))
    _field(h, json.dumps(dict(settings or {}), sort_keys=True, default=str).encode())
    with open(config, "rb") as f:
        _field(h, f.read())
    for name in _weight_files(model_dir):
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        _field(h, name.encode())
        _field(h, struct.pack("<Q", size))
        with open(path, "rb") as f:
            start = 0
            if name.endswith(".safetensors"):
                header = _safetensors_header(f, size, path)
                _field(h, header)
                start = 8 + len(header)
            for offset, n in _spans(start, size, full):
                f.seek(offset)
                data = f.read(n)
                if len(data) != n:
                    raise ModelError(f"{path}: short read at byte {offset} (file changed while hashing?)")
                h.update(struct.pack("<QQ", offset, n))
                h.update(data)
    return h.hexdigest()


def _field(h, data: bytes) -> None:
    # Length-prefixed, so no two different field sequences hash the same byte stream.
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _weight_files(model_dir: str) -> list[str]:
    names = sorted(os.listdir(model_dir))
    picked = [n for n in names if n.endswith(".safetensors")]
    if not picked:
        picked = [n for n in names if n.endswith((".bin", ".pt"))]
    picked = [n for n in picked if os.path.isfile(os.path.join(model_dir, n))]
    if not picked:
        raise ModelError(f"ref.path={model_dir}: no weight files (*.safetensors, *.bin, *.pt) in the folder")
    return picked


def _safetensors_header(f, size: int, path: str) -> bytes:
    raw = f.read(8)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if n <= 0 or 8 + n > size:
        raise ModelError(f"{path}: not a safetensors file (header length {n}, file size {size})")
    return f.read(n)


def _spans(start: int, end: int, full: bool) -> list[tuple[int, int]]:
    """(offset, length) pieces of [start, end) to hash: all of it, or the strided sample."""
    if end <= start:
        return []
    if full:
        return [(o, min(_BLOCK, end - o)) for o in range(start, end, _BLOCK)]
    offsets = sorted(set(range(start, end, _STRIDE)) | {max(start, end - _SAMPLE)})
    return [(o, min(_SAMPLE, end - o)) for o in offsets]
