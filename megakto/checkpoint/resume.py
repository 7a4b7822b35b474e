"""``train.resume``: what a run does with a verified checkpoint, in two halves around building the
policy engine (:mod:`megakto.checkpoint` documents the checkpoint itself; its manager calls them).

* :func:`prepare` (before the policy exists): the saved trainer state this rank continues from,
  checked against this run's data stream, and the folder DeepSpeed is to load. At another
  data-parallel size that is the checkpoint's universal form (:mod:`megakto.checkpoint.universal`),
  converted by rank 0 unless it already exists, once its recorded parameter shapes match
  model.path's (a 32B conversion is hundreds of GB and minutes).
* :func:`restore` (once the policy exists): the checkpoint must hold this model, then engine
  (weights, Adam, LR schedule), the frozen base checked against a universal folder's (a LoRA run's
  base comes from model.path there, not from the checkpoint), RNG states (re-derived from the seed and step on every rank when
  the ranks are not the ones that saved: another number of ranks, or any universal layout).

Both are collective: every rank calls them, all pass or all fail.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from megakto.checkpoint import universal
from megakto.checkpoint._pipeline_universal import saved_shapes, to_hf_names
from megakto.checkpoint.manifest import STATE_VERSION, checkpoints_dir, read_manifest, state_file, verify
from megakto.checkpoint.resolve import ranks_moved, resume_layout
from megakto.checkpoint.rng import derive_rng_state, set_rng_state
from megakto.distributed import comm, engine
from megakto.errors import ConfigError, MegaktoError
from megakto.model.expert_names import hf_shapes as expert_hf_shapes
from megakto.model.meta import hf_shapes, param_shapes
from megakto.model.tp_merge import join_shard_shapes
from megakto.model.vocab_blocks import vocab_layout

__all__ = ["held_shapes", "whole_shapes", "load_state", "load_engine", "prepare", "restore", "check_same_model"]


def held_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Every parameter's shape as this rank holds it (ZeRO-3: the whole, not its partition)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}


def prepare(resume_dir: str | None, cfg, *, tp: int, sampler, log: Callable[[str], None], ep: int = 1, pp: int = 1
            ) -> tuple[dict | None, str | None]:
    """The saved trainer state and the folder DeepSpeed loads ((None, None): a fresh start); the
    sampler's position restored. ``tp``, ``ep``, ``pp``: this run's tensor-, expert- and
    pipeline-parallel sizes."""
    if resume_dir is None:
        return None, None
    saved_tp, saved_pp = (read_manifest(resume_dir).get(f"{k}_size", 1) for k in ("tp", "pp"))
    layout = resume_layout(resume_dir, comm.world_size(), ep, tp_size=tp, pp_size=pp)
    # The saved ranks are not this run's (a universal layout, or ZeRO stage 0 at another size):
    # rank r takes (r % tp)'s state (rank 0's at another tp size), and its RNG states are derived
    # (restore).
    moved = ranks_moved(resume_dir, comm.world_size(), ep, tp_size=tp, pp_size=pp)
    joined = moved and saved_pp > 1  # each pipeline rank recorded its own stage's shapes: all of them
    with comm.fail_together(group=comm.world_group()):
        state = load_state(resume_dir, universal.source_rank(comm.rank(), tp, saved_tp) if moved else None)
        shapes = saved_shapes(resume_dir) if joined and comm.is_main() else None  # one reader of every file
    if joined:
        state["param_shapes"] = comm.broadcast_object(shapes, group=comm.world_group())
    with comm.fail_together(group=comm.world_group()):
        saved, now = state["sampler"].get("global_batch_size"), cfg.train.global_batch_size
        if saved is not None and saved != now:
            raise ConfigError(f"train.resume: {resume_dir} was trained with train.global_batch_size={saved} "
                              f"but this run has {now}; the data stream continues only at the same global batch "
                              f"size: set train.global_batch_size={saved} (the ranks and micro-batch size may change)")
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as err:
            raise ConfigError(f"train.resume: {resume_dir}: {err}") from None
    # Before converting (or loading a universal folder at another tp size): the checkpoint's whole
    # shapes (its tp ranks' shards joined) against config.json's.
    with comm.fail_together(group=comm.world_group()):
        if comm.is_main() and state.get("param_shapes") is not None and (layout == "convert" or saved_tp != tp):
            now = param_shapes(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
            check_same_model(resume_dir, cfg.model.path, whole_shapes(resume_dir, state, now), now)
    if layout != "convert":
        return state, resume_dir
    with comm.fail_together(group=comm.world_group()):
        if pp > 1 and state.get("vocab_layout"):
            raise ConfigError(f"train.resume: {resume_dir} has its vocabulary matrices in {len(state['vocab_layout'])} "
                              f"blocks (model.vocab_block_rows), which a pipeline run does not split: resume it "
                              f"with parallel.pp_size={saved_pp}")
    target = universal.universal_dir(resume_dir, checkpoints_dir(cfg.output_dir))
    names, layers = universal.expert_names(resume_dir, ep), universal.layer_names(pp)
    # For tensor parallelism: ZeRO-3's flat tensors shaped, vocabulary blocks joined (it never splits them).
    for_tp = tp > 1
    if for_tp:
        state = {**state, "vocab_layout": []}
    # A large model: convert first with tools/to_universal.py.
    with comm.fail_together(group=comm.world_group()), comm.others_wait(
            f"rank 0 converts {resume_dir} to its universal form", log):
        if comm.is_main():
            start = time.perf_counter()
            why = (universal.stale(resume_dir, target, names, for_tp=for_tp, layers=layers)
                   if os.path.exists(target) else None)
            reused = os.path.exists(target) and why is None
            if why is not None:  # e.g. the step was saved again since: its old weights must not load
                log(f"{target} is not the universal form of {resume_dir} ({why}): converting it again")
            universal.convert(resume_dir, target, names=names, for_tp=for_tp, layers=layers, log=log)
            log(f"{'reusing' if reused else 'converted'} {resume_dir} ({state['world_size']} ranks) "
                f"-> {target} for {comm.world_size()} ranks ({time.perf_counter() - start:.1f} s)")
    with comm.fail_together(group=comm.world_group()):  # its own block: verifying the conversion is collective
        why = verify(target)
        if why is not None:
            raise ConfigError(f"train.resume: {target} (the universal form of {resume_dir}): {why}")
    return state, target


def whole_shapes(resume_dir: str, state: dict, now: dict[str, list[int]]) -> dict:
    """The checkpoint's parameter shapes under Hugging Face names, whole: each of its tp ranks'
    recorded shards (``state``: one rank's trainer state, ranks 0..tp-1 hold the others; a
    pipeline's names made Hugging Face's) joined against ``now``, this run's model (:func:`megakto.model.tp_merge.join_shard_shapes`)."""
    manifest = read_manifest(resume_dir)
    saved_tp, saved_ep = manifest.get("tp_size", 1), manifest.get("ep_size", 1)
    shards = [state["param_shapes"] if r == state.get("rank") else load_state(resume_dir, r).get("param_shapes") or {}
              for r in range(saved_tp)]
    return join_shard_shapes([hf_shapes(expert_hf_shapes(to_hf_names(s), saved_ep)) for s in shards], now)


def restore(state: dict, resume_dir: str, load_dir: str, policy, cfg, *, log: Callable[[str], None], ep: int = 1,
            tp: int | None = None, pp: int = 1) -> list[tuple[int, dict[str, float]]]:
    """Load ``load_dir`` into the ``policy`` engine and this rank's RNG states; the eval history.
    ``ep``, ``tp``, ``pp``: this run's expert-, tensor- and pipeline-parallel sizes (tp None: the
    checkpoint's)."""
    saved_tp = read_manifest(resume_dir).get("tp_size", 1)
    with comm.fail_together(group=comm.world_group()):
        saved, now = state.get("vocab_layout", []), vocab_layout(policy.module)
        if saved != now:
            def fmt(sizes):
                return f"{len(sizes)} blocks of {sizes[0]} rows" if sizes else "unsplit"
            raise ConfigError(f"train.resume: {resume_dir} has its vocabulary matrices {fmt(saved)}, this "
                              f"run {fmt(now)}; set model.vocab_block_rows to the checkpoint's value")
        # At another tp size the shards differ: their whole shapes were compared before (prepare).
        if state.get("param_shapes") is not None and tp in (None, saved_tp):
            saved, now = state["param_shapes"], held_shapes(policy.module)
            if pp > 1 or read_manifest(resume_dir).get("pp_size", 1) > 1:
                # A pipeline rank holds its stage's parameters, the checkpoint may have recorded all.
                saved, now = to_hf_names(saved), to_hf_names(now)
                saved = {name: saved.get(name, "absent") for name in now} if pp > 1 else saved
            if saved != now:  # another expert-parallel size: each holds another share of the experts
                saved_ep = read_manifest(resume_dir).get("ep_size", 1)
                saved, now = expert_hf_shapes(saved, saved_ep), expert_hf_shapes(now, ep)
            check_same_model(resume_dir, cfg.model.path, saved, now)
    # A file DeepSpeed cannot load: one line naming it, every rank exits 1.
    with comm.fail_together(group=comm.world_group()):
        load_engine(policy, load_dir)
    frozen = universal.frozen_file(load_dir)
    with comm.fail_together(group=comm.world_group()):  # the base model.path gave against the checkpoint's
        name = engine.frozen_mismatch(policy.module, frozen) if frozen else None
        if name is not None:
            raise ConfigError(f"train.resume: {resume_dir}: the frozen weights of model.path={cfg.model.path} are "
                              f"not the checkpoint's ({name} differs from {frozen}); resume with the base model "
                              "the run was trained from")
    if ranks_moved(resume_dir, comm.world_size(), ep, tp_size=tp, pp_size=pp):  # every rank alike, rank 0 too
        derive_rng_state(cfg.seed, state["step"], comm.rank())
    else:
        set_rng_state(state["rng"])
    via = "" if load_dir == resume_dir else f" through {load_dir}"
    log(f"resumed from {resume_dir} at step {state['step']}{via} "
        f"({state['world_size']} ranks then, {comm.world_size()} now)")
    return [(s, dict(m)) for s, m in state["eval_history"]]


def check_same_model(resume_dir: str, model_path: str, saved: dict, now: dict) -> None:
    """The checkpoint's parameters (names and shapes) must be this model's: before a conversion
    both under Hugging Face names (the model built on the meta device), once the policy exists
    as this rank's tensor-parallel rank holds them (checkpoints saved before shapes were recorded
    are not checked)."""
    if saved == now:
        return
    name = next((n for n in sorted(set(saved) | set(now)) if saved.get(n) != now.get(n)), None)
    where = f"{name} is {saved.get(name, 'absent')} there and {now.get(name, 'absent')} here"
    raise ConfigError(f"train.resume: {resume_dir} holds another model's weights than "
                      f"model.path={model_path} ({len(saved)} parameters there, {len(now)} here; {where}); "
                      "resume with the model it was trained from")


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
