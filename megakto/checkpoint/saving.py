"""Saving a checkpoint atomically (the protocol: :mod:`megakto.checkpoint`): every rank writes into
``.tmp-step-N`` and hashes what it wrote, rank 0 writes the manifest and renames the directory
(the commit), then moves ``latest`` and prunes."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable

import torch

from megakto.checkpoint.housekeeping import drop_universal, prune, remove_stale
from megakto.checkpoint.manifest import (DIGEST, LATEST, MANIFEST, STATE_VERSION, TMP_PREFIX, file_digest, state_file,
                                         tag_name, tag_step)
from megakto.distributed import comm, engine

__all__ = ["FAULT_ENV", "save", "commit"]

# Test-only fault injection: rank 0 exits after every rank has written step N's files and before
# the rename that commits them, the worst moment for a crash.
FAULT_ENV = "MEGAKTO_FAULT_EXIT_IN_SAVE"


def save(policy, ckpt_dir: str, step: int, trainer_state: dict, *, keep_last: int, dtype: str,
         tp_size: int = 1, pp_size: int = 1, sp_size: int = 1, ep_size: int = 1,
         log: Callable[[str], None] | None = None, timing: dict | None = None) -> str:
    """Write checkpoint ``step`` atomically (see :mod:`megakto.checkpoint`); every rank calls it.

    ``trainer_state`` is this rank's own state (plain types). Returns the committed tag directory.
    ``log``: where rank 0 says that it commits while the others wait (default: stderr, rank 0).
    ``timing``: gets ``hashing``, the seconds this rank spent checksumming the files it wrote.
    """
    tag = tag_name(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir, final_dir = os.path.join(ckpt_dir, tmp_tag), os.path.join(ckpt_dir, tag)
    rank = comm.rank()
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a crash while saving this same step
    comm.barrier(group=comm.world_group())

    digests = {}  # this rank's files -> checksum, taken right after each is written
    hashing = [0.0]

    def written(path):
        begin = time.perf_counter()
        digests[os.path.basename(path)] = file_digest(path)
        hashing[0] += time.perf_counter() - begin

    engine.save_checkpoint(policy, ckpt_dir, tmp_tag, on_write=written)
    state = {"version": STATE_VERSION, "rank": rank, "world_size": comm.world_size(), **trainer_state}
    path = os.path.join(tmp_dir, state_file(rank))
    torch.save(state, path)
    _fsync(path)
    written(path)
    # Also the barrier: every rank's files are in tmp_dir.
    gathered = comm.all_gather_object(digests, group=comm.world_group())

    # The fsyncs, the rename and the pruning run on rank 0 alone: on a slow shared filesystem the
    # others can wait in the barrier below for long, against the collective timeout.
    with comm.others_wait(f"rank 0 commits {tag} (fsync, manifest, rename, prune)", log or _info):
        if rank == 0:
            if os.environ.get(FAULT_ENV) == str(step):
                os._exit(1)
            digests = {name: digest for d in gathered for name, digest in d.items()}
            commit(tmp_dir, final_dir, step=step, world_size=comm.world_size(), dtype=dtype, digests=digests,
                   tp_size=tp_size, pp_size=pp_size, sp_size=sp_size, ep_size=ep_size)
            _write_atomic(os.path.join(ckpt_dir, LATEST), tag)
            prune(ckpt_dir, keep_last)
            remove_stale(ckpt_dir)
    comm.barrier(group=comm.world_group())  # nobody starts the next step (or save) before the commit
    if timing is not None:
        timing["hashing"] = hashing[0]
    return final_dir


def commit(tmp_dir: str, final_dir: str, *, step: int, world_size: int, dtype: str, digests: dict,
            tp_size: int = 1, pp_size: int = 1, sp_size: int = 1, ep_size: int = 1, extra: dict | None = None) -> None:
    """Manifest, then the rename. ``digests``: the checksums the writing ranks took; a file that
    none reported (written outside the checkpoint engine's ``save``) is hashed here. Files in
    subfolders (a universal checkpoint's ``zero/``) are listed by their relative paths. ``extra``:
    more manifest keys. A step saved again replaces the old tag, and the universal form of an
    earlier save of this step goes (:func:`~megakto.checkpoint.housekeeping.drop_universal`)."""
    files, sums = {}, {}
    for folder, _, names in sorted(os.walk(tmp_dir)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, tmp_dir)
            _fsync(path)
            files[rel] = os.path.getsize(path)
            sums[rel] = digests.get(rel) or file_digest(path)
    manifest = {"step": step, "tag": os.path.basename(final_dir), "world_size": world_size, "tp_size": tp_size,
                "pp_size": pp_size, "sp_size": sp_size, "ep_size": ep_size, "dtype": dtype, **(extra or {}),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, DIGEST: sums}
    _write_atomic(os.path.join(tmp_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    aside = None
    if os.path.exists(final_dir):
        # Same step saved before (a run resumed from an older tag): set the old one aside first,
        # since a directory cannot be renamed onto a non-empty one.
        aside = os.path.join(os.path.dirname(final_dir), f"{TMP_PREFIX}old-{os.path.basename(final_dir)}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final_dir, aside)
    if tag_step(os.path.basename(final_dir)) is not None:
        drop_universal(final_dir)  # converted from an earlier save of this step, if any
    os.rename(tmp_dir, final_dir)  # the commit
    _fsync(os.path.dirname(final_dir))
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def _write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.path.basename(path)}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _info(message: str) -> None:
    if comm.is_main():
        print(f"megakto: {message}", file=sys.stderr, flush=True)
