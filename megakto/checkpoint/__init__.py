"""Checkpoints that survive a crash, exact resume, and the export of a checkpoint's weights.

Layout under ``output_dir/checkpoints/``, on a filesystem every rank sees (multi-node runs need a
shared one: rank 0 renames the directory that all ranks wrote into)::

    latest                         text: the newest complete tag (DeepSpeed's own format, so its
                                   tools and ``engine.load_checkpoint(dir)`` understand it)
    hf_base/                       the run's model config, generation config, tokenizer and chat
                                   template, written once (the export reads it)
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

The package, one concern a module; the trainer holds one :class:`CheckpointManager` (``manager``),
built from the config, the parallel layout and the run's log::

    manifest      names, the manifest, checksums, verify (sizes, sha256, pickles; shared over ranks)
    housekeeping  the complete tags, pruning, what crashed saves left
    rng           every generator's state as plain types, and derived states
    saving        save and commit (atomic: the rename is the commit)
    resolve       train.resume -> the verified tag, and how this run's layout loads it
    resume        the resume's two halves around building the policy engine
    universal     DeepSpeed's universal form, to resume at another data-parallel size
    weights       a checkpoint's weights under Hugging Face names: one reader per layout
    export        a checkpoint -> a Hugging Face folder (tools/zero_to_hf.py, train.export_hf)
    manager       the run's checkpoints as one object
"""

from megakto.checkpoint.export import check_export, export_checkpoint, probe_batch, resolve_checkpoint
from megakto.checkpoint.housekeeping import complete_tags, newest_complete, prune, remove_stale
from megakto.checkpoint.manager import CheckpointManager
from megakto.checkpoint.manifest import (CHECKPOINTS, DIGEST, HF_BASE, LATEST, MANIFEST, STATE_VERSION, TMP_PREFIX,
                                         UNIVERSAL, UNIVERSAL_PREFIX, checkpoints_dir, file_digest, hash_shares,
                                         problem, read_manifest, state_file, tag_name, verify)
from megakto.checkpoint.resolve import ranks_moved, resolve_resume, resume_layout
from megakto.checkpoint.resume import load_engine, load_state
from megakto.checkpoint.rng import derive_rng_state, rng_state, set_rng_state
from megakto.checkpoint.saving import FAULT_ENV, commit, save
from megakto.checkpoint.weights import is_lora_checkpoint, read_weights

__all__ = [
    "CheckpointManager",
    # the on-disk protocol
    "CHECKPOINTS", "LATEST", "MANIFEST", "HF_BASE", "UNIVERSAL", "UNIVERSAL_PREFIX", "TMP_PREFIX", "STATE_VERSION",
    "DIGEST", "FAULT_ENV", "tag_name", "checkpoints_dir", "state_file", "read_manifest", "problem", "file_digest",
    "hash_shares", "verify", "complete_tags", "newest_complete", "prune", "remove_stale", "save", "commit",
    # resume
    "resolve_resume", "resume_layout", "ranks_moved", "load_state", "load_engine",
    "rng_state", "set_rng_state", "derive_rng_state",
    # weights and export
    "read_weights", "is_lora_checkpoint", "resolve_checkpoint", "export_checkpoint", "check_export", "probe_batch",
]
