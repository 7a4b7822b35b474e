"""``train.resume`` -> the tag a run continues from, verified on every rank, and what loading it
means at this run's layout: refused (a ZeRO stage 0 checkpoint at another tensor-parallel or
pipeline layout, a universal folder named for the other kind of run ...), loaded as it is, or
converted to DeepSpeed's universal form first (ZeRO partitions at another data-parallel,
tensor-parallel, pipeline or expert-parallel layout)."""

from __future__ import annotations

import os
import sys

from megakto.checkpoint._tp_universal import FOR_TP
from megakto.checkpoint.housekeeping import complete_tags
from megakto.checkpoint.manifest import DIGEST, LAYER_NAMES, UNIVERSAL, checkpoints_dir, read_manifest, verify
from megakto.distributed import comm
from megakto.distributed.parallel import mesh_text
from megakto.errors import ConfigError

__all__ = ["resolve_resume", "resume_layout", "ranks_moved", "layouts_note"]


def _warn(message: str) -> None:
    if comm.is_main():
        print(f"megakto: warning: {message}", file=sys.stderr, flush=True)


def resolve_resume(resume: str, output_dir: str, *, world_size: int, tp_size: int = 1, pp_size: int = 1,
                   sp_size: int = 1, ep_size: int = 1, warn=_warn) -> str | None:
    """``train.resume`` -> the tag directory to load, or None to start fresh. Collective.

    auto: the newest checkpoint in output_dir/checkpoints that passes :func:`verify` (a damaged
    newer one is skipped with ``warn``), None if there is none at all. none: None. Anything else:
    a tag directory, which must pass :func:`verify`. Either way it must have been written by as
    many ranks as this run has, at the same tensor-parallel size, unless it holds ZeRO partitions,
    which convert to the universal form for another layout (see :func:`resume_layout`)."""
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
        _check_world_size(candidate, resume, world_size, tp_size, pp_size, sp_size, ep_size)  # before hashing: a mismatch is no damage
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


def _layout(world: int | None, tp: int, pp: int, sp: int, ep: int) -> str:
    """``4 ranks as dp 2 × tp 2 × pp 1``: a world size and its degrees, the data-parallel size being
    what the world leaves (the degrees alone when a manifest predates the world size, or its world
    is no whole mesh)."""
    whole = world is not None and world % (tp * pp * sp) == 0
    mesh = mesh_text(world // (tp * pp * sp) if whole else None, tp=tp, pp=pp, sp=sp, ep=ep)
    ranks = "an unrecorded number of ranks" if world is None else f"{world} rank{'s' if world != 1 else ''}"
    return f"{ranks} {'as' if whole else 'at'} {mesh}"


def layouts_note(resume: str, output_dir: str, *, world_size: int, tp_size: int = 1, pp_size: int = 1,
                 sp_size: int = 1, ep_size: int = 1) -> str | None:
    """``train.resume: <tag> was written by <layout>; this run is <layout>`` for the checkpoint
    ``train.resume`` names (auto: the newest complete one, unverified), to add to a start-up
    refusal of this run's layout (a tp size the model does not divide); None when there is none."""
    resume = resume.strip()
    if resume == "none":
        return None
    tags = complete_tags(checkpoints_dir(output_dir)) if resume == "auto" else [(None, os.path.abspath(resume))]
    manifest = read_manifest(tags[-1][1]) if tags else None
    if not manifest:
        return None
    saved = (manifest.get(f"{k}_size", 1) for k in ("tp", "pp", "sp", "ep"))
    return (f"train.resume: {tags[-1][1]} was written by {_layout(manifest.get('world_size'), *saved)}; this run is "
            f"{_layout(world_size, tp_size, pp_size, sp_size, ep_size)}")


def _check_world_size(path: str, resume: str, world_size: int, tp_size: int = 1, pp_size: int = 1,
                      sp_size: int = 1, ep_size: int = 1) -> None:
    """Refuse the layout changes nothing can load, in one line naming the checkpoint's layout and
    this run's, before anything is hashed or converted: a tensor-parallel or pipeline layout change of
    a checkpoint without ZeRO partitions, another tp degree together with a pipeline, a universal
    folder named for the other kind of run. Another data-parallel, tensor-parallel or pipeline size
    of a ZeRO checkpoint is fine: see :func:`resume_layout`."""
    manifest = read_manifest(path)
    if not manifest:
        return  # no manifest: verify() reports that
    saved = manifest.get("world_size")
    with_saved = "" if saved is None else f"{saved} processes and "  # None: a manifest from before it was recorded
    # Manifests from before each degree was recorded: 1.
    saved_tp, saved_pp, saved_sp, saved_ep = (manifest.get(f"{k}_size", 1) for k in ("tp", "pp", "sp", "ep"))

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"train.resume={resume}: {path} was written by "
                           f"{_layout(saved, saved_tp, saved_pp, saved_sp, saved_ep)}; this run is "
                           f"{_layout(world_size, tp_size, pp_size, sp_size, ep_size)}: {why}")

    universal = manifest.get("format") == UNIVERSAL
    zero = universal or any(name.endswith("optim_states.pt") for name in manifest.get("files", {}))
    # Another pipeline degree (to or from none) goes through the universal form, which needs ZeRO
    # partitions: a ZeRO stage 0 checkpoint keeps Adam's states per pipeline stage (or per model).
    if saved_pp != pp_size and not zero:
        raise refuse(f"it holds no ZeRO partitions (ZeRO stage 0), so its Adam states do not move to another "
                     f"pipeline layout: resume with parallel.pp_size={saved_pp}")
    if saved_tp != tp_size and max(saved_pp, pp_size) > 1:
        raise refuse(f"another parallel.tp_size with a pipeline on either side is not supported: resume with "
                     f"parallel.tp_size={saved_tp}, or change the pipeline and the tensor-parallel degree in two "
                     "resumes, one through parallel.pp_size=1")
    names = manifest.get(LAYER_NAMES)
    if universal and names is not None and names != ("pipeline" if pp_size > 1 else "hf"):
        raise refuse(f"its universal form is under {names} parameter names, for "
                     f"{'a pipeline' if names == 'pipeline' else 'no pipeline'}: resume from the step-* directory "
                     "it was converted from, which is converted again for this run")
    # Another data-parallel or tensor-parallel size under tensor parallelism goes through the
    # universal form (whole tensors, which AutoTP cuts again), which needs ZeRO partitions: a stage 0
    # checkpoint's model files are one tp rank's shards each.
    moved = (saved_tp != tp_size or ((saved_tp > 1 or saved_pp > 1) and saved is not None and saved != world_size))
    if moved and not zero:
        keep = f"parallel.tp_size={saved_tp}" if saved_tp != tp_size else f"{saved} processes"
        raise refuse(f"it holds no ZeRO partitions (ZeRO stage 0), so it has no universal conversion: resume with "
                     f"{keep}")
    if manifest.get("format") == UNIVERSAL and saved_tp == 1 and tp_size > 1 and not manifest.get(FOR_TP):
        raise refuse("it was converted for a run without tensor parallelism (flat ZeRO-3 tensors, vocabulary "
                     f"blocks): resume from the step-* directory it was converted from ({manifest.get('source')}), "
                     "which is converted again for this run")
    # Sequence parallelism: the data-parallel size is world / sp, so another sp regroups which ranks
    # hold which rows, and no universal conversion of a sequence-parallel checkpoint has been tested.
    if saved_sp != sp_size or (saved_sp > 1 and saved is not None and saved != world_size):
        raise refuse(f"another sequence-parallel size, or another number of ranks under sequence parallelism, is not "
                     f"supported: resume with {with_saved}parallel.sp_size={saved_sp}")
    moved = saved_ep != ep_size or (saved_ep > 1 and saved is not None and saved != world_size)
    why = _expert_layout_refused(manifest, saved_ep, ep_size, moved)
    if why:
        raise refuse(why)


def _expert_layout_refused(manifest: dict, saved_ep: int, ep_size: int, moved: bool) -> str | None:
    """Why a checkpoint cannot resume at this run's ``ep_size``, or None. ``moved``: another
    expert-parallel layout (``saved_ep`` -> ``ep_size``, or the same ep_size at another world
    size), which goes through the universal form (:func:`resume_layout`). A regular load would not
    do: DeepSpeed 0.19.8 loads another autoep_size without an error and trains the experts on
    optimizer partitions of the wrong layout (measured: every expert off by 0.5 after one step)."""
    universal = manifest.get("format") == UNIVERSAL
    if universal and saved_ep > 1 and (manifest.get("expert_names", "autoep") == "hf") != (ep_size == 1):
        return (f"its experts are under {manifest.get('expert_names', 'autoep')} names, for "
                f"{'no ' if ep_size > 1 else ''}expert parallelism: resume from the step-* directory it was "
                "converted from, which is converted again for this run")
    if not moved:
        return None
    if saved_ep == 1 and ep_size > 1:
        return ("a checkpoint without expert parallelism does not resume under it (its universal form under "
                "Hugging Face names is not converted to AutoEP's): resume with parallel.ep_size=1")
    if not universal and not any(name.endswith("optim_states.pt") for name in manifest.get("files", {})):
        return (f"it holds no ZeRO partitions (ZeRO stage 0) and so has no universal conversion: resume with "
                f"{manifest.get('world_size')} processes and parallel.ep_size={saved_ep}")
    return None


def resume_layout(path: str, world_size: int, ep_size: int = 1, *, tp_size: int | None = None,
                  pp_size: int = 1) -> str:
    """How DeepSpeed loads the checkpoint ``path`` (past :func:`resolve_resume`) in a run of
    ``world_size`` ranks, ``ep_size``, ``tp_size`` (None: the checkpoint's own) and ``pp_size``:
    ``same`` (its own files: the ranks that wrote it, or ZeRO stage 0, whose files are per model or
    per pipeline stage, not per rank), ``universal`` (it is one, :mod:`megakto.checkpoint.universal`)
    or ``convert`` (ZeRO partitions of another data-parallel, tensor-parallel, pipeline or
    expert-parallel layout: convert it first)."""
    manifest = read_manifest(path)
    if manifest.get("format") == UNIVERSAL:
        return "universal"
    zero = any(name.endswith("optim_states.pt") for name in manifest["files"])
    saved = manifest.get("world_size")
    moved = ((saved is not None and saved != world_size) or manifest.get("ep_size", 1) != ep_size
             or (tp_size is not None and manifest.get("tp_size", 1) != tp_size)
             or manifest.get("pp_size", 1) != pp_size)
    return "convert" if zero and moved else "same"


def ranks_moved(path: str, world_size: int, ep_size: int = 1, *, tp_size: int | None = None,
                pp_size: int = 1) -> bool:
    """Whether this run's ranks are not the ones that wrote ``path``, so none has a trainer state
    (RNG states above all) of its own there: a universal layout (converted, or resumed directly, at
    any size), or another number of ranks (ZeRO stage 0's per-model files load as they are, but
    ``trainer_state_rank{r}.pt`` exists only for the ranks that saved)."""
    saved = read_manifest(path).get("world_size")
    return (resume_layout(path, world_size, ep_size, tp_size=tp_size, pp_size=pp_size) != "same"
            or (saved is not None and saved != world_size))
