"""The run's checkpoints as the one object the trainer holds: which checkpoint ``train.resume``
continues from, the resume itself, every save, and the final export to a Hugging Face folder.

The resume comes in two halves around building the policy engine, because the engine is built
for the folder it will load (a universal one needs DeepSpeed's ``load_universal``), and that
folder is known only once the checkpoint has been read (and, at another data-parallel size,
converted): :meth:`CheckpointManager.prepare` before, :meth:`CheckpointManager.resume` after.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from megakto.checkpoint import saving
from megakto.checkpoint.export import export_checkpoint, save_hf_base
from megakto.checkpoint.manifest import checkpoints_dir, read_manifest, tag_name
from megakto.checkpoint.resolve import resolve_resume
from megakto.checkpoint.resume import held_shapes, prepare, restore
from megakto.checkpoint.rng import rng_state
from megakto.distributed import comm
from megakto.model.lora import ADAPTER_DIR
from megakto.model.vocab_blocks import vocab_layout

__all__ = ["CheckpointManager"]


class CheckpointManager:
    """Built at start-up, before anything loads: ``train.resume`` is resolved to a verified tag
    (or None, a fresh start) on every rank, all passing or all failing. ``dims``: the run's
    parallel layout (its tp and pp sizes are recorded in every save and checked at resume);
    ``dtype``: the dtype the run trains in (the export writes it); ``log``: the run's log (rank 0).

    Every method is collective (every rank calls it) except :meth:`export_hf`, rank 0's alone."""

    def __init__(self, cfg, dims, *, dtype: torch.dtype, log: Callable[[str], None]):
        self.cfg, self.tp, self.pp, self.sp, self.ep, self.log = cfg, dims.tp, dims.pp, dims.sp, dims.ep, log
        self.dtype = str(dtype).removeprefix("torch.")
        self.ckpt_dir = checkpoints_dir(cfg.output_dir)
        with comm.fail_together(group=comm.world_group()):  # verifying is collective: all ranks pass or fail
            self.resume_dir = resolve_resume(cfg.train.resume, cfg.output_dir, world_size=comm.world_size(),
                                             tp_size=dims.tp, pp_size=dims.pp, sp_size=dims.sp, ep_size=dims.ep)
        self.start_step = read_manifest(self.resume_dir)["step"] if self.resume_dir else 0
        self.resume_state: dict | None = None  # the saved trainer state this rank continues from (prepare)
        self.load_dir: str | None = None  # the folder DeepSpeed loads: the tag, or its universal form
        self.saved_step: int | None = None  # the step whose checkpoint is on disk: the resumed one, then each save
        self.last_save: dict[str, float] = {}  # the last save's seconds spent hashing on this rank

    def prepare(self, sampler) -> str | None:
        """Before the policy is built: this rank's saved trainer state, checked against the run's data
        stream, and the sampler's position restored; returns the folder the policy engine is to load
        (None: a fresh start), converted to its universal form first at another data-parallel size
        (:func:`megakto.checkpoint.resume.prepare`)."""
        self.resume_state, self.load_dir = prepare(self.resume_dir, self.cfg, tp=self.tp, sampler=sampler,
                                                   log=self.log, ep=self.ep, pp=self.pp)
        return self.load_dir

    def resume(self, policy, *, carried: Mapping[str, Any] = MappingProxyType({})
               ) -> tuple[int, list[tuple[int, dict[str, float]]]]:
        """Once the policy exists: engine (weights, Adam, LR schedule) and RNG states from the
        checkpoint; the step to continue from (0: a fresh start) and the eval history. ``carried``:
        objects with ``load_state_dict`` whose saved state (:meth:`save`) they continue from; one the
        checkpoint holds none of (saved before it was carried, or switched off then) starts afresh."""
        if self.resume_state is None:
            return 0, []
        history = restore(self.resume_state, self.resume_dir, self.load_dir, policy, self.cfg, log=self.log,
                          ep=self.ep, tp=self.tp, pp=self.pp)
        saved = self.resume_state.get("carried", {})
        for name, obj in carried.items():
            if name in saved:
                obj.load_state_dict(saved[name])
        self.saved_step = self.resume_state["step"]
        return self.resume_state["step"], history

    def save(self, policy, step: int, *, sampler, eval_history, tokenizer,
             carried: Mapping[str, Any] = MappingProxyType({})) -> str:
        """Checkpoint ``step``: the policy engine and this rank's trainer state (sampler position, RNG
        states, vocabulary-block layout, parameter shapes, eval history, the ``state_dict`` of each
        ``carried`` object under its name), committed atomically; at
        the first save rank 0 also copies the run's model config and tokenizer into ``hf_base``.
        Returns the committed tag directory."""
        cfg, start = self.cfg, time.perf_counter()
        module = policy.module
        if comm.is_main():
            lora = module.peft_config["default"] if cfg.model.lora.r else None
            save_hf_base(self.ckpt_dir, cfg.model.path, tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                         lora=lora)
        state = {"step": step, "sampler": sampler.state_dict(), "rng": rng_state(),
                 "vocab_layout": vocab_layout(module), "param_shapes": held_shapes(module),
                 "eval_history": [[s, m] for s, m in eval_history],
                 "carried": {name: obj.state_dict() for name, obj in carried.items()}}
        self.last_save = {}
        path = saving.save(policy, self.ckpt_dir, step, state, keep_last=cfg.checkpoint.keep_last, dtype=self.dtype,
                           tp_size=self.tp, pp_size=self.pp, sp_size=self.sp, ep_size=self.ep, log=self.log,
                           timing=self.last_save)
        self.saved_step = step
        self.log(f"saved {path} ({time.perf_counter() - start:.1f} s)")
        return path

    def export_hf(self, step: int) -> str | None:
        """Rank 0 converts the checkpoint of ``step`` into output_dir/hf (a LoRA run: merged, and its
        adapter alone into output_dir/adapter); the other ranks do not wait, so a long conversion
        cannot trip the collective timeout."""
        tag_dir = os.path.join(self.ckpt_dir, tag_name(step))
        adapter = os.path.join(self.cfg.output_dir, ADAPTER_DIR) if self.cfg.model.lora.r else None
        out = export_checkpoint(tag_dir, os.path.join(self.cfg.output_dir, "hf"), adapter_dir=adapter,
                                trust_remote_code=self.cfg.model.trust_remote_code)
        self.log(f"exported {out}" + (f" (merged) and the adapter to {adapter}" if adapter else ""))
        return out
