"""Checkpoints that survive a crash, and exact resume.

Layout under ``output_dir/checkpoints/``, on a filesystem every rank sees (multi-node runs need a
shared one: rank 0 renames the directory that all ranks wrote into)::

    latest                         text: the newest complete tag (DeepSpeed's own format, so its
                                   tools and ``engine.load_checkpoint(dir)`` understand it)
    hf_base/                       the run's model config, generation config, tokenizer and chat
                                   template, written once (megakto.export reads it)
    step-00000012/                 one checkpoint ("tag"), policy only, never the reference
        complete                   JSON manifest: step, world size, tp and pp sizes, dtype, every file's
                                   size and sha256 (each hashed by the rank that wrote it, just after)
        trainer_state_rank{r}.pt   step, sampler position, RNG states, eval history (plain types)
        zero_pp_rank_*_mp_rank_XX_{model,optim}_states.pt   DeepSpeed's: weights, Adam, LR schedule
        mp_rank_XX_model_states.pt                          (ZeRO-1/2: the whole module, from dp rank 0)
                                   XX = the tensor-parallel rank (00 only without tensor parallelism)
        layer_LL-model_00-model_states.pt   pipelines: pipeline layer LL's weights (first data-parallel
                                   rank of its stage); zero_pp_rank_D_mp_rank_SS_optim_states.pt per
                                   rank (SS = the stage); mp_rank_SS_model_states.pt the engine state
    .tmp-step-00000016/            a save in progress, or left by a crash: never loaded, removed

A save is atomic. Every rank writes into ``.tmp-step-N`` (DeepSpeed's files, then its own trainer
state, hashing each file just after writing it), an all-gather of those checksums waits for all
of them, and rank 0 writes the manifest and renames the directory
to ``step-N``: the rename is the commit. Only then does ``latest`` move (temp file + os.replace)
and old tags get pruned, so a kill at any point leaves the previous complete checkpoint loadable,
and ``resume: auto`` picks the newest directory that has a manifest whose files are all there.

Before a resume every file is verified: its size, its sha256 against the manifest, and its pickle
(no global beyond tensors, plain types and DeepSpeed's own classes). The hashing is shared: the
manifest's files are dealt out largest first, each to the rank with the fewest bytes so far, so
each rank reads about 1/world of the checkpoint, and the verdicts are gathered, so every rank takes the
same decision. With ``resume: auto`` a newest checkpoint that fails is skipped with a
warning naming it and why, and the next older one is tried; if none passes, the run stops (it does
not silently start over). A manifest from before checksums were recorded is accepted on sizes and
the pickle scan alone, with a warning saying so.

Resume restores the engine (weights, optimizer, LR schedule), then the sampler position, every
rank's RNG states and the step, so the data stream continues where it stopped: within an epoch no
row is seen twice and none is skipped. Our own files hold plain dicts of ints, floats, lists and
tensors and are read with ``torch.load(weights_only=True)``; DeepSpeed's files are scanned before
DeepSpeed unpickles them (see ``engine.check_deepspeed_pickles``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from megakto.distributed import comm, engine
from megakto.errors import ConfigError, MegaktoError

__all__ = [
    "CHECKPOINTS",
    "LATEST",
    "MANIFEST",
    "tag_name",
    "checkpoints_dir",
    "read_manifest",
    "problem",
    "file_digest",
    "hash_shares",
    "verify",
    "complete_tags",
    "newest_complete",
    "resolve_resume",
    "resume_layout",
    "ranks_moved",
    "prune",
    "remove_stale",
    "rng_state",
    "set_rng_state",
    "derive_rng_state",
    "save",
    "commit",
    "state_file",
    "load_state",
    "load_engine",
]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "complete"
HF_BASE = "hf_base"  # the run's model config and tokenizer, beside the tags (megakto.export)
UNIVERSAL = "universal"  # a manifest's "format" for DeepSpeed's universal layout (megakto.universal)
UNIVERSAL_PREFIX = "universal-"  # universal-<tag>: a tag's universal form, beside it (megakto.universal)
TMP_PREFIX = ".tmp-"
STATE_VERSION = 1
DIGEST = "sha256"  # the manifest's key for the files' checksums (hashlib name)
# Test-only fault injection: rank 0 exits after every rank has written step N's files and before
# the rename that commits them, the worst moment for a crash.
FAULT_ENV = "MEGAKTO_FAULT_EXIT_IN_SAVE"

_TAG = re.compile(r"^step-(\d{8,})$")


def tag_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def state_file(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


# ---------------------------------------------------------------------------------------------
# Finding complete checkpoints


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
    checks its share of the files (see the module docstring); all get the same answer. Otherwise
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


def _warn(message: str) -> None:
    if comm.is_main():
        print(f"megakto: warning: {message}", file=sys.stderr, flush=True)


def _info(message: str) -> None:
    if comm.is_main():
        print(f"megakto: {message}", file=sys.stderr, flush=True)


def complete_tags(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every ``step-*`` directory with a manifest, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        match = _TAG.match(name)
        path = os.path.join(ckpt_dir, name)
        if match and os.path.isdir(path) and read_manifest(path) is not None:
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_complete(ckpt_dir: str) -> str | None:
    """The newest tag that passes :func:`problem`; damaged newer ones are skipped."""
    for _, path in reversed(complete_tags(ckpt_dir)):
        if problem(path) is None:
            return path
    return None


def resolve_resume(resume: str, output_dir: str, *, world_size: int, tp_size: int = 1, pp_size: int = 1,
                   warn=_warn) -> str | None:
    """``train.resume`` -> the tag directory to load, or None to start fresh. Collective.

    auto: the newest checkpoint in output_dir/checkpoints that passes :func:`verify` (a damaged
    newer one is skipped with ``warn``), None if there is none at all. none: None. Anything else:
    a tag directory, which must pass :func:`verify`. Either way it must have been written by as
    many ranks as this run has (DeepSpeed's ZeRO partitions are per rank), at the same
    tensor-parallel size (AutoTP shards are per tp rank); the number of data-parallel ranks may
    differ (see :func:`resume_layout`)."""
    resume = resume.strip()
    if resume == "none":
        return None
    auto = resume == "auto"
    ckpt_dir = checkpoints_dir(output_dir)
    candidates = [p for _, p in reversed(complete_tags(ckpt_dir))] if auto else [os.path.abspath(resume)]
    # Rank 0's listing: every rank verifies the same tags.
    candidates = comm.broadcast_object(candidates, group=comm.world_group())
    path, skipped = None, []
    for candidate in candidates:
        _check_world_size(candidate, resume, world_size, tp_size, pp_size)  # before hashing: a mismatch is no damage
        why = verify(candidate)
        if why is None:
            path = candidate
            break
        if not auto:
            hint = ("it holds checkpoints; pass one of its step-* directories or train.resume=auto"
                    if complete_tags(candidate) else "pass a complete step-* directory, auto or none")
            raise ConfigError(f"train.resume={resume}: not a loadable checkpoint: {why}; {hint}")
        warn(f"train.resume=auto: skipping {candidate}: {why}")
        skipped.append(f"{os.path.basename(candidate)} ({why})")
    if path is None:
        if skipped:
            raise ConfigError(f"train.resume=auto: no checkpoint in {ckpt_dir} passes verification: "
                              f"{'; '.join(skipped)}; set train.resume=none to start over")
        return None
    manifest = read_manifest(path)
    if DIGEST not in manifest:
        warn(f"{path}: its manifest has no checksums (saved before they were recorded); only file sizes and "
             "pickles were checked")
    return path


def _check_world_size(path: str, resume: str, world_size: int, tp_size: int = 1, pp_size: int = 1) -> None:
    """Refuse the layout changes nothing can load: another pipeline or tensor-parallel degree, and a
    pipeline checkpoint at another world size. Another data-parallel size is fine: see
    :func:`resume_layout`."""
    manifest = read_manifest(path)
    if not manifest:
        return  # no manifest: verify() reports that
    saved_pp = manifest.get("pp_size", 1)  # manifests from before pipelines: pp 1
    if saved_pp != pp_size:
        raise ConfigError(f"train.resume={resume}: {path} was written with parallel.pp_size={saved_pp} but this run "
                          f"has parallel.pp_size={pp_size}; "
                          + ("its weights are per-layer pipeline files" if saved_pp > 1 else "its weights are ZeRO files")
                          + f", resume with parallel.pp_size={saved_pp}")
    saved_tp = manifest.get("tp_size", 1)  # manifests from before tensor parallelism: tp 1
    saved = manifest.get("world_size")
    if saved_tp != tp_size or (saved_tp > 1 and saved is not None and saved != world_size
                               and manifest.get("format") != UNIVERSAL):
        raise ConfigError(f"train.resume={resume}: {path} was written by {saved} ranks with parallel.tp_size={saved_tp} "
                          f"but this run has {world_size} with parallel.tp_size={tp_size}; {TP_UNIVERSAL_UNSUPPORTED}: "
                          f"resume with {saved} processes and parallel.tp_size={saved_tp}")
    if saved_pp > 1 and saved is not None and saved != world_size:
        raise ConfigError(f"train.resume={resume}: {path} is a pipeline checkpoint written by {saved} ranks but this "
                          f"run has {world_size}; DeepSpeed's universal conversion does not cover pipeline layer "
                          f"files, resume with {saved} processes")


# Measured with deepspeed 0.19.8 on megakto's AutoTP checkpoints (ZeRO-3, TP2 x DP2 on 4 ranks):
# ds_to_universal stops while merging a replicated norm weight, so neither another data-parallel
# size nor another TP degree can be reached through a universal checkpoint.
TP_UNIVERSAL_UNSUPPORTED = ("another parallel.tp_size, or another number of ranks under tensor parallelism, is not "
                            "supported (deepspeed 0.19.8's universal conversion fails on megakto's AutoTP checkpoints: "
                            "\"Rank 0 supplied a shard of 64 elements, but the map describes 0\")")


def resume_layout(path: str, world_size: int) -> str:
    """How DeepSpeed loads the checkpoint ``path`` (past :func:`resolve_resume`) in a run of
    ``world_size`` ranks: ``same`` (its own files: the ranks that wrote it, or ZeRO stage 0, whose
    files are per model, not per rank), ``universal`` (it is one, megakto.universal) or ``convert``
    (ZeRO partitions of another data-parallel size: convert it first)."""
    manifest = read_manifest(path)
    if manifest.get("format") == UNIVERSAL:
        return "universal"
    zero = any(name.endswith("optim_states.pt") for name in manifest["files"])
    saved = manifest.get("world_size")
    return "convert" if zero and saved is not None and saved != world_size else "same"


def ranks_moved(path: str, world_size: int) -> bool:
    """Whether this run's ranks are not the ones that wrote ``path``, so none has a trainer state
    (RNG states above all) of its own there: a universal layout (converted, or resumed directly, at
    any size), or another number of ranks (ZeRO stage 0's per-model files load as they are, but
    ``trainer_state_rank{r}.pt`` exists only for the ranks that saved)."""
    saved = read_manifest(path).get("world_size")
    return resume_layout(path, world_size) != "same" or (saved is not None and saved != world_size)


# ---------------------------------------------------------------------------------------------
# Housekeeping (rank 0)


def prune(ckpt_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete tags; returns what was deleted.

    The newest complete tag is never deleted, whatever ``keep_last`` says. Directories without a
    manifest are not touched here (an unfinished save is a ``.tmp-*`` directory; see
    :func:`remove_stale`). A deleted tag's universal form beside it goes too
    (:func:`_drop_universal`)."""
    tags = complete_tags(ckpt_dir)
    doomed = [path for _, path in tags[: max(0, len(tags) - max(1, keep_last))]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        _drop_universal(path)
    return doomed


def _drop_universal(tag_dir: str) -> None:
    """Delete ``universal-<tag>`` beside ``tag_dir`` when it was converted from ``tag_dir`` (its
    manifest's ``source``), now that the tag is pruned or saved again: it would hold the old weights
    and Adam moments (12 bytes a parameter) after its source is gone. A universal form of another
    run's tag, or one without a manifest, is left alone."""
    tag_dir = os.path.abspath(tag_dir)
    path = os.path.join(os.path.dirname(tag_dir), UNIVERSAL_PREFIX + os.path.basename(tag_dir))
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("format") == UNIVERSAL and manifest.get("source") == tag_dir:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale(ckpt_dir: str) -> list[str]:
    """Delete ``.tmp-*`` entries left by crashed saves. Only call it when no save is running."""
    if not os.path.isdir(ckpt_dir):
        return []
    stale = [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n.startswith(TMP_PREFIX)]
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return stale


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


# ---------------------------------------------------------------------------------------------
# RNG states as plain types (weights_only=True loads them)


def rng_state() -> dict:
    """This process's generator states: python, numpy, torch CPU and the accelerator's."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "accelerator": engine.accelerator_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    engine.set_accelerator_rng_state(state["accelerator"])


def derive_rng_state(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy, torch and the accelerator from (seed, step, rank): a resume at another
    number of ranks cannot give each rank a saved state, so every rank derives one the same way on
    every run (sha256, never the per-process ``hash``)."""
    digest = hashlib.sha256(f"megakto.rng:{seed}:{step}:{rank}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    random.seed(value)
    np.random.seed(value % (1 << 32))
    torch.manual_seed(value)  # every device's generator too


# ---------------------------------------------------------------------------------------------
# Save and load (collective)


def save(policy, ckpt_dir: str, step: int, trainer_state: dict, *, keep_last: int, dtype: str,
         tp_size: int = 1, pp_size: int = 1, log: Callable[[str], None] | None = None) -> str:
    """Write checkpoint ``step`` atomically (see the module docstring); every rank calls it.

    ``trainer_state`` is this rank's own state (plain types). Returns the committed tag directory.
    ``log``: where rank 0 says that it commits while the others wait (default: stderr, rank 0).
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

    def written(path):
        digests[os.path.basename(path)] = file_digest(path)

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
                   tp_size=tp_size, pp_size=pp_size)
            _write_atomic(os.path.join(ckpt_dir, LATEST), tag)
            prune(ckpt_dir, keep_last)
            remove_stale(ckpt_dir)
    comm.barrier(group=comm.world_group())  # nobody starts the next step (or save) before the commit
    return final_dir


def commit(tmp_dir: str, final_dir: str, *, step: int, world_size: int, dtype: str, digests: dict,
            tp_size: int = 1, pp_size: int = 1, extra: dict | None = None) -> None:
    """Manifest, then the rename. ``digests``: the checksums the writing ranks took; a file that
    none reported (written outside the checkpoint engine's ``save``) is hashed here. Files in
    subfolders (a universal checkpoint's ``zero/``) are listed by their relative paths. ``extra``:
    more manifest keys. A step saved again replaces the old tag, and the universal form of an
    earlier save of this step goes (:func:`_drop_universal`)."""
    files, sums = {}, {}
    for folder, _, names in sorted(os.walk(tmp_dir)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, tmp_dir)
            _fsync(path)
            files[rel] = os.path.getsize(path)
            sums[rel] = digests.get(rel) or file_digest(path)
    manifest = {"step": step, "tag": os.path.basename(final_dir), "world_size": world_size, "tp_size": tp_size,
                "pp_size": pp_size, "dtype": dtype, **(extra or {}),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, DIGEST: sums}
    _write_atomic(os.path.join(tmp_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    aside = None
    if os.path.exists(final_dir):
        # Same step saved before (a run resumed from an older tag): set the old one aside first,
        # since a directory cannot be renamed onto a non-empty one.
        aside = os.path.join(os.path.dirname(final_dir), f"{TMP_PREFIX}old-{os.path.basename(final_dir)}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final_dir, aside)
    if _TAG.match(os.path.basename(final_dir)):
        _drop_universal(final_dir)  # converted from an earlier save of this step, if any
    os.rename(tmp_dir, final_dir)  # the commit
    _fsync(os.path.dirname(final_dir))
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def load_state(tag_dir: str, rank: int | None = None) -> dict:
    """Rank ``rank``'s trainer state from ``tag_dir`` (``weights_only=True``: plain types only);
    None: this rank's."""
    rank = comm.rank() if rank is None else rank
    try:
        state = engine.weights_only_load(os.path.join(tag_dir, state_file(rank)), map_location="cpu")
    except MegaktoError as err:
        raise ConfigError(f"train.resume: {err}") from None
    info = state if isinstance(state, dict) else {}
    if info.get("version") != STATE_VERSION or info.get("rank") != rank:
        raise ConfigError(f"train.resume: {os.path.join(tag_dir, state_file(rank))} is not rank {rank}'s "
                          f"trainer state (version {info.get('version')}, rank {info.get('rank')})")
    return state


def load_engine(policy, tag_dir: str) -> None:
    """Restore weights, optimizer and LR schedule from ``tag_dir`` into a fresh engine. Collective.
    A file that cannot be loaded is a ModelError naming it (call it inside ``comm.fail_together``)."""
    tag_dir = os.path.normpath(tag_dir)
    engine.load_checkpoint(policy, os.path.dirname(tag_dir), os.path.basename(tag_dir))
