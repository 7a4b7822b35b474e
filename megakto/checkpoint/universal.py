"""Resume at another data-parallel size: DeepSpeed's universal checkpoints around megakto's own.

A ZeRO checkpoint's optimizer partitions (and, under ZeRO-3, its weights) are cut per
data-parallel rank, so only the same number of ranks loads them. DeepSpeed's ``ds_to_universal``
rewrites them as one unsharded fp32 file per parameter (weights and both Adam moments), which an
engine built with ``checkpoint.load_universal`` re-partitions over any data-parallel size. What it
does not carry is megakto's trainer state; :func:`convert` adds it, so the result is a megakto
checkpoint like any other: verified at resume, exported by tools/zero_to_hf.py (its weights are read by
:func:`megakto.checkpoint.weights.universal_weights`).

Layout, beside the ``step-*`` tags (``output_dir/checkpoints/`` or wherever the tool writes it)::

    universal-step-00000004/
        complete                       manifest: a tag's, plus "format": "universal", "source" (the
                                       converted tag) and "source_manifest" (the sha256 of the
                                       source's manifest, which names that save's every checksum),
                                       "for_tensor_parallel" (megakto.checkpoint._tp_universal);
                                       it lists the files below by relative path
        zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, zero/optimizer_state.pt   DeepSpeed's
        *mp_rank_XX_model_states.pt    the source's engine states (LR schedule, step counters)
        trainer_state_rank{t}.pt       the source's trainer state of ranks 0..tp-1 (the first
                                       data-parallel rank of each tensor-parallel rank): step,
                                       sampler position, vocabulary-block layout, parameter shapes
        frozen_params.pt               the parameters no optimizer owns (a LoRA run's frozen base),
                                       whole, from the source's model states, which ZeRO saves
                                       each rank's fragment of; only if there are any. The
                                       manifest's "frozen" names the file and where it was taken
                                       from; the export reads it only if it matches its sha256
    hf_base/                           copied from beside the source if missing (the export needs it)

It is written like a save: into a ``.tmp-`` folder, every file checksummed (the manifest's
``sha256``, verified at resume as a save's), the manifest last, committed by one rename. The work
is staged (megakto.checkpoint._stages): DeepSpeed's extraction and merge, the rest of its
conversion, the frozen parameters, the trainer states; each finished stage is recorded with the
checksums of the files it wrote, so a conversion killed midway (tools/to_universal.py, or the
trainer's rank 0 while the others wait) continues after its last finished stage when run again,
and never commits a partial folder. A second conversion of the same save finds it complete and
reuses it; a folder converted from an earlier save of the same tag path (a run rolled back and saved
that step again) is converted afresh. Pruning the source tag, or saving its step again, deletes the
universal form beside it (megakto.checkpoint.housekeeping); one made from another run's tag stays
until deleted by hand.

A LoRA run resumed through it takes its base from model.path as any run does (only the adapters
are the optimizer's, so only they come from the folder, and only they train), and checks it against
``frozen_params.pt`` (megakto.checkpoint.resume.restore: each rank its own partition): another base
stops the resume in one line. The export of the folder takes the base from ``frozen_params.pt``, the
checkpoint's own, never model.path's.

The sampler state is global (megakto.data.sampler), so the resumed run draws the same global
batches at any data-parallel size as long as the global batch size is unchanged. RNG states were
per rank and cannot be shared out again: every rank of a run resumed through a universal folder
(at any size, the saving one too) derives its own from (seed, step, rank) instead
(megakto.checkpoint.rng.derive_rng_state, megakto.checkpoint.resolve.ranks_moved).

Expert-parallel checkpoints (``parallel.ep_size`` > 1, DeepSpeed AutoEP) convert too: DeepSpeed
gathers every expert into one whole tensor per parameter, which an AutoEP engine cuts again for its
own expert-parallel size and rank. A run without expert parallelism needs the Hugging Face names
instead: ``convert(..., expert_names="hf")`` rewrites them (megakto.checkpoint._expert_universal),
and the manifest's ``"expert_names"`` says which a folder holds (a folder of the other kind is
converted afresh). The conversion needs Adam's moments: megakto always trains with AdamW.

Tensor-parallel (AutoTP) checkpoints convert too, each tp rank's shards joined into the whole
parameter by the affine maps AutoTP records (megakto repairs those of the parameters it leaves
whole: megakto.distributed._deepspeed.engines), and resume at any tp size on any number of
data-parallel ranks: the target's loader cuts each whole tensor by its parameter's AutoTP metadata.
ZeRO-3's flat files (a checkpoint saved without tensor parallelism) are shaped for that
(megakto.checkpoint._tp_universal); every tp rank's trainer state is kept.

Pipeline checkpoints (ZeRO-1) convert too: their fp32 masters and moments are in the optimizer
partitions, named by the pipeline's layer indices, so the folder loads at any pipeline degree and
data-parallel size; under ``layers="hf"`` (a run without pipeline) the parameters are renamed to
the model's names, and a data-parallel checkpoint converted for a pipeline the reverse, the ZeRO
stage changing with it (megakto.checkpoint._pipeline_universal; the manifest's ``"layer_names"``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch

from megakto.checkpoint._expert_universal import rename_to_hf
from megakto.checkpoint._pipeline_universal import rename_layers
from megakto.checkpoint._stages import Stages
from megakto.checkpoint._tp_universal import FOR_TP, join_vocab_blocks, shape_flat_tensors
from megakto.checkpoint.manifest import (DIGEST, HF_BASE, LAYER_NAMES, MANIFEST, TMP_PREFIX, UNIVERSAL,
                                         UNIVERSAL_PREFIX, file_digest, problem, read_manifest, state_file)
from megakto.checkpoint.saving import commit
from megakto.distributed import engine
from megakto.errors import ModelError

__all__ = ["PREFIX", "EXPERT_NAMES", "FROZEN", "universal_dir", "source_rank", "expert_names", "convert", "converted",
           "stale", "frozen_file", "frozen_weights"]

PREFIX = UNIVERSAL_PREFIX
SOURCE_MANIFEST = "source_manifest"  # the universal manifest's key: sha256 of the source's manifest file
EXPERT_NAMES = "expert_names"  # the universal manifest's key: "autoep" (an AutoEP engine's names) or "hf"
FROZEN = "frozen_params.pt"  # the parameters no optimizer owns (a LoRA run's base), whole
FROZEN_KEY = "frozen"  # the universal manifest's key: {"file": FROZEN, "from": where they were taken}
_LAYOUT_STARTED = "layout.started"  # in the work folder: the in-place rewrite of zero/ has begun


def universal_dir(tag_dir: str, ckpt_dir: str | None = None) -> str:
    """Where the universal form of ``tag_dir`` goes: ``universal-<tag>`` in ``ckpt_dir`` (default:
    beside it)."""
    tag_dir = os.path.normpath(tag_dir)
    return os.path.join(ckpt_dir or os.path.dirname(tag_dir), PREFIX + os.path.basename(tag_dir))


def source_rank(rank: int, tp_size: int, saved_tp: int | None = None) -> int:
    """The saved rank whose trainer state rank ``rank`` takes at another layout: at the same
    tensor-parallel size (``saved_tp`` None or ``tp_size``) the first data-parallel rank with its
    tensor-parallel rank (TP is innermost: rank % tp); at another one rank 0 (what differs between
    tp ranks, their RNG states and shard shapes, is re-derived and joined instead)."""
    return rank % tp_size if saved_tp in (None, tp_size) else 0


def _source_digest(tag_dir: str) -> str:
    return file_digest(os.path.join(tag_dir, MANIFEST))


def expert_names(tag_dir: str, ep_size: int) -> str:
    """The names the universal form of ``tag_dir`` is to have for a run of ``ep_size``: ``hf`` for
    an expert-parallel save resumed without expert parallelism, else ``autoep`` (which for a save
    without experts are the Hugging Face names already)."""
    return "hf" if ep_size == 1 and read_manifest(tag_dir).get("ep_size", 1) > 1 else "autoep"


def layer_names(pp_size: int) -> str:
    """The parameter names a run of ``pp_size`` pipeline stages loads: ``pipeline`` or ``hf``."""
    return "pipeline" if pp_size > 1 else "hf"


def stale(tag_dir: str, out_dir: str, names: str = "autoep", *, for_tp: bool = False,
          layers: str | None = None) -> str | None:
    """Why ``out_dir`` is not a complete universal form of the save now at ``tag_dir`` under
    ``names`` (:func:`expert_names`), for a tensor-parallel run or not (``for_tp``), its
    parameters under ``layers`` names (:func:`layer_names`; None: any) (one phrase), or None. The source is identified by its manifest's checksum, not its path alone: a
    tag saved again at the same path is another save (sizes checked here; the resume verifies
    checksums)."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("format") != UNIVERSAL:
        return problem(out_dir) or "not a universal checkpoint"
    if manifest.get(FOR_TP, False) != for_tp:
        return f"converted for a run {'with' if not for_tp else 'without'} tensor parallelism"
    if manifest.get(EXPERT_NAMES, "autoep") != names:
        return f"its experts are under {manifest.get(EXPERT_NAMES, 'autoep')} names, this run needs {names} names"
    if layers is not None and manifest.get(LAYER_NAMES, "hf") != layers:
        return f"its parameters are under {manifest.get(LAYER_NAMES, 'hf')} names, this run needs {layers} names"
    if manifest.get("source") != os.path.abspath(tag_dir):
        return f"converted from {manifest.get('source')}"
    if manifest.get(SOURCE_MANIFEST) != _source_digest(tag_dir):
        return f"converted from an earlier save of {os.path.basename(os.path.normpath(tag_dir))}"
    return problem(out_dir)


def converted(tag_dir: str, out_dir: str, names: str = "autoep", *, for_tp: bool = False,
              layers: str | None = None) -> bool:
    """``out_dir`` is a complete universal form of the save now at ``tag_dir`` (:func:`stale`)."""
    return stale(tag_dir, out_dir, names, for_tp=for_tp, layers=layers) is None


def convert(tag_dir: str, out_dir: str, *, workers: int = 1, names: str = "autoep", for_tp: bool = False,
            layers: str | None = None, log: Callable[[str], None] | None = None) -> str:
    """Write the universal form of the complete ZeRO tag ``tag_dir`` (verified by the caller) to
    ``out_dir``, atomically, its experts under ``names`` (:func:`expert_names`), its parameters
    under ``layers`` (``pipeline`` or ``hf`` names; default: the source's kind), for a
    tensor-parallel run if ``for_tp`` (ZeRO-3's flat tensors shaped, vocabulary blocks joined:
    megakto.checkpoint._tp_universal); returns ``out_dir``. One process; reused if already complete;
    a conversion of the same save killed midway continues after its last finished stage (``log``
    says which)."""
    tag_dir, out_dir = os.path.abspath(tag_dir), os.path.abspath(out_dir)
    source = _source_digest(tag_dir)  # before reading it: the save this conversion is of
    manifest = read_manifest(tag_dir)
    layers = layers or ("pipeline" if manifest.get("pp_size", 1) > 1 else "hf")
    if converted(tag_dir, out_dir, names, for_tp=for_tp, layers=layers):
        return out_dir
    if manifest.get("format") == UNIVERSAL:
        raise ModelError(f"{tag_dir} is a universal checkpoint already; resume from it directly")
    if not any(name.endswith("optim_states.pt") for name in manifest["files"]):
        raise ModelError(f"{tag_dir} holds no ZeRO partitions (ZeRO stage 0): it loads at any data-parallel size "
                         "as it is")
    parent = os.path.dirname(out_dir)
    work = os.path.join(parent, TMP_PREFIX + os.path.basename(out_dir))
    staged = os.path.join(work, os.path.basename(out_dir))  # DeepSpeed writes latest_universal beside it
    key = {"source": tag_dir, SOURCE_MANIFEST: source, EXPERT_NAMES: names, FOR_TP: for_tp, LAYER_NAMES: layers}
    stages = Stages(work, staged, key)
    if os.path.exists(os.path.join(work, _LAYOUT_STARTED)) and "layout" not in stages.done:
        shutil.rmtree(work)  # killed while rewriting zero/ in place: its files are neither form, start over
        stages = Stages(work, staged, key)
    if stages.done and log is not None:
        log(f"continuing the conversion of {tag_dir} after its finished stages ({', '.join(stages.done)})")
    # Recorded shapes: a TP checkpoint saved before megakto fixed its replicated maps is repaired by them.
    shapes = engine.weights_only_load(os.path.join(tag_dir, state_file(0))).get("param_shapes") or {}
    stages.run("zero", lambda: engine.to_universal(tag_dir, staged, workers=workers, shapes=shapes,
                                                   done=stages.done, finished=stages.finished))
    tp = manifest.get("tp_size", 1)
    # (model-state files of one tp rank hold its shards of the frozen parameters, not the whole)
    stages.run("frozen", lambda: _write_frozen(tag_dir, staged) if tp == 1 else None)

    def trainer_states():
        for rank in range(tp):
            shutil.copy2(os.path.join(tag_dir, state_file(rank)), staged)
    stages.run("trainer", trainer_states)

    def layout():  # in place: a kill inside it starts the conversion over (above)
        open(os.path.join(work, _LAYOUT_STARTED), "w").close()
        if tp == 1:  # (tensor-parallel checkpoints have no pipeline; their ranks record shards)
            engine.universal_any_stage(staged)
            rename_layers(staged, tag_dir, layers)
        if names == "hf":
            rename_to_hf(staged, shapes)
        if for_tp:  # ZeRO-3's flat files shaped so that AutoTP cuts them; tensor parallelism has no vocabulary blocks
            shape_flat_tensors(staged, shapes)
            join_vocab_blocks(staged)
    stages.run("layout", layout)
    base, target = (os.path.join(d, HF_BASE) for d in (os.path.dirname(tag_dir), parent))
    if os.path.isdir(base) and not os.path.isdir(target):
        shutil.copytree(base, target)
    extra = {"format": UNIVERSAL, **key}  # the save it is of and the kind of run it is for
    if os.path.isfile(os.path.join(staged, FROZEN)):
        extra[FROZEN_KEY] = {"file": FROZEN, "from": f"{tag_dir}'s model states (the frozen parameters' fragments)"}
    commit(staged, out_dir, step=manifest["step"], world_size=manifest.get("world_size"),
           dtype=manifest.get("dtype", "float32"), digests=stages.digests(), tp_size=tp, pp_size=1,
           ep_size=manifest.get("ep_size", 1), extra=extra)
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _write_frozen(tag_dir: str, staged: str) -> dict:
    """The parameters no optimizer owns (a LoRA run's frozen base) into ``staged/frozen_params.pt``,
    whole, if there are any (``ds_to_universal`` carries the optimizer's parameters alone)."""
    frozen = engine.frozen_params(tag_dir)
    if frozen:
        torch.save(frozen, os.path.join(staged, FROZEN))
    return frozen


def frozen_file(tag_dir: str) -> str | None:
    """The frozen parameters' file of a universal folder (its manifest's ``frozen``), or None."""
    frozen = (read_manifest(tag_dir) or {}).get(FROZEN_KEY)
    return os.path.join(tag_dir, frozen["file"]) if frozen else None


def frozen_weights(tag_dir: str) -> dict[str, torch.Tensor]:
    """The frozen parameters a universal folder holds (:func:`_write_frozen`), checked against the
    sha256 its manifest records for them, so that no export mixes in another base; empty if none."""
    manifest = read_manifest(tag_dir) or {}
    if FROZEN_KEY not in manifest:
        return {}
    path = os.path.join(tag_dir, manifest[FROZEN_KEY]["file"])
    want = manifest.get(DIGEST, {}).get(manifest[FROZEN_KEY]["file"])
    if want is None or not os.path.isfile(path) or file_digest(path) != want:
        raise ModelError(f"{path}: the frozen parameters are missing or do not match their {DIGEST} in the "
                         f"manifest (from {manifest[FROZEN_KEY]['from']})")
    return engine.weights_only_load(path, map_location="cpu")
