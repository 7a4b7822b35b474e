"""What a committed checkpoint ("tag") holds and whether it can be loaded: names, the manifest,
the checksums, and verification (sizes, sha256, pickles) shared out over the ranks. The on-disk
protocol is documented in :mod:`megakto.checkpoint`."""

from __future__ import annotations

import hashlib
import json
import os
import re

from megakto.distributed import comm, engine

__all__ = ["CHECKPOINTS", "LATEST", "MANIFEST", "HF_BASE", "UNIVERSAL", "UNIVERSAL_PREFIX", "LAYER_NAMES",
           "TMP_PREFIX", "STATE_VERSION", "DIGEST", "tag_name", "tag_step", "checkpoints_dir", "state_file",
           "read_manifest",
           "problem", "file_digest", "hash_shares", "verify"]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "complete"
HF_BASE = "hf_base"  # the run's model config and tokenizer, beside the tags (megakto.checkpoint.export)
UNIVERSAL = "universal"  # a manifest's "format" for DeepSpeed's universal layout (megakto.checkpoint.universal)
UNIVERSAL_PREFIX = "universal-"  # universal-<tag>: a tag's universal form, beside it (megakto.checkpoint.universal)
# A universal manifest's key: "pipeline" (a PipelineModule's parameter names) or "hf" (the model's).
LAYER_NAMES = "layer_names"
TMP_PREFIX = ".tmp-"
STATE_VERSION = 1
DIGEST = "sha256"  # the manifest's key for the files' checksums (hashlib name)

_TAG = re.compile(r"^step-(\d{8,})$")


def tag_name(step: int) -> str:
    return f"step-{step:08d}"


def tag_step(name: str) -> int | None:
    """The step of a tag's directory name (``step-00000012`` -> 12); None for any other name."""
    match = _TAG.match(name)
    return int(match.group(1)) if match else None


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def state_file(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


def read_manifest(tag_dir: str) -> dict | None:
    """The manifest of a committed tag, or None (no manifest, or unreadable)."""
    try:
        with open(os.path.join(tag_dir, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    if not (isinstance(manifest, dict) and "step" in manifest and isinstance(manifest.get("files"), dict)
            and isinstance(manifest.get(DIGEST, {}), dict)):
        return None  # not one of ours, or hand-edited: unusable, never a TypeError later
    return manifest


def problem(tag_dir: str) -> str | None:
    """Why ``tag_dir`` cannot be loaded (one phrase), or None if it is complete: a manifest,
    and every file it lists present with the size it had when it was committed."""
    if not os.path.isdir(tag_dir):
        return "no such directory"
    if os.path.basename(os.path.normpath(tag_dir)).startswith(TMP_PREFIX):
        return "an unfinished save (temporary directory)"
    manifest = read_manifest(tag_dir)
    if manifest is None:
        return f"no '{MANIFEST}' manifest (the save did not finish)"
    for name, size in manifest["files"].items():
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {size}"
    return None


def file_digest(path: str) -> str:
    """Hex ``DIGEST`` of the file at ``path`` (read in pieces, never whole into memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, DIGEST).hexdigest()


def _check_files(tag_dir: str, names: list[str], digests: dict | None) -> str | None:
    """Why one of ``names`` (files of a committed tag) cannot be loaded, or None: a checksum that
    differs from the manifest's (``digests``; None: an old manifest without them), or a pickle
    that names a foreign class or cannot be read at all."""
    for name in names:
        path = os.path.join(tag_dir, name)
        try:
            if digests is not None:
                if name not in digests:
                    return f"{name} has no {DIGEST} in the manifest"
                if file_digest(path) != digests[name]:
                    return f"{name} does not match its {DIGEST} in the manifest (damaged after the save)"
            if name.endswith(".pt"):
                why = engine.unsafe_pickle(path)
                if why is not None:
                    return f"{name}: {why}"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
    return None


def hash_shares(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """The files each rank hashes at resume: largest first, each to the rank with the fewest bytes so
    far (lowest rank on ties), so no rank reads much more than 1/world of the checkpoint. The same
    on every rank: it depends on the manifest alone."""
    shares, loads = [[] for _ in range(world_size)], [0] * world_size
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = loads.index(min(loads))
        shares[r].append(name)
        loads[r] += sizes[name]
    return shares


def verify(tag_dir: str, *, collective: bool = True) -> str | None:
    """Why ``tag_dir`` cannot be loaded (one phrase), or None: :func:`problem` (sizes), then every
    file's checksum and pickle (:func:`_check_files`). ``collective``: every rank calls it and
    checks its share of the files (see :mod:`megakto.checkpoint`); all get the same answer. Otherwise
    this process checks them all (the offline tools)."""
    why = problem(tag_dir)
    if why is None:
        manifest = read_manifest(tag_dir)
        sizes = manifest["files"]
        names = hash_shares(sizes, comm.world_size())[comm.rank()] if collective else hash_shares(sizes, 1)[0]
        why = _check_files(tag_dir, names, manifest.get(DIGEST))
    if collective:
        why = next((w for w in comm.all_gather_object(why, group=comm.world_group()) if w is not None), None)
    return why
