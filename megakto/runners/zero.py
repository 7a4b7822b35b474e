"""The ZeRO (0-3) mode, with AutoTP when ``dims.tp > 1``: the policy loaded under ZeRO-3 (optionally
with LoRA), per micro-batch forward, ``backward``, ``step``; the online reference a frozen ZeRO-3
inference engine. Under tensor parallelism the output head is split over the vocabulary, so
vocabulary blocks and generated eval samples are off."""

from __future__ import annotations

from typing import Callable

import torch

from megakto import checkpoint
from megakto.data.batcher import Batcher
from megakto.distributed import comm, engine as ds_engine
from megakto.distributed.parallel import ParallelDims
from megakto.errors import MegaktoError
from megakto.model.families import router_top_k
from megakto.model.lora import apply_lora
from megakto.model.packing_check import startup_packing_check
from megakto.model.router import micro_batch_balance
from megakto.model.tp_checks import check_vocab_parallel_head
from megakto.model.vocab_blocks import vocab_layout
from megakto.reference.build import online_reference
from megakto.runners.base import SAMPLES_OFF, EngineWatch, LossFn, ModeSetup, Pairs, TrainOutcome, model_of

__all__ = ["ZeroMode", "ZeroRunner"]


class ZeroRunner:
    def __init__(self, engine, *, batcher: Batcher, logps_fn: Callable, dp_group: comm.ProcessGroup,
                 router_top_k: int | None = None):
        self.engine = engine
        self._batch = batcher  # pairs -> PackedBatch on the device
        self._logps = logps_fn  # (model, PackedBatch) -> (logps, n_tokens)
        self.dp_group = dp_group  # tensor-parallel peers hold the same rows: count each once
        # kto.router_aux_coef > 0: the policy's top-k, and each training forward returns its router
        # logits for the balancing loss; None: the forwards ask for nothing more.
        self.router_top_k = router_top_k

    @torch.no_grad()
    def score(self, batches: list[Pairs]) -> list[torch.Tensor]:
        return [self._logps(self.engine, self._batch(pairs))[0] for pairs in batches]

    def train(self, batches: list[Pairs], loss_fn: LossFn, *, scale: float, skipped: str | None) -> TrainOutcome:
        out, watch = TrainOutcome(skipped=skipped), EngineWatch(self.engine)
        for i, pairs in enumerate(batches):
            if out.skipped is not None and not out.poisoned:
                break  # nothing accumulated yet: the step is skipped without a backward
            batch = self._batch(pairs)
            micro, logps, n_tokens = self._forward(i, batch, loss_fn)
            loss = micro.loss
            # One flag over the world, so that every rank of every group skips alike.
            if not out.poisoned and comm.any_rank(not bool(torch.isfinite(loss.detach())),
                                                  group=comm.world_group()):
                out.skipped = "non-finite loss"
                if not out.backwards:
                    out.sums.add_micro(micro, logps=logps, n_tokens=n_tokens, tokens=batch.num_tokens)
                    break
                # Earlier micro-batches' gradients already sit in the engine, which can only drop them at
                # the accumulation boundary: a NaN gradient makes DeepSpeed's overflow check discard the
                # whole step there, and the engine stays in step with its micro-batches.
                out.poisoned = True
                loss = loss * float("nan")
            self.engine.backward(loss * scale)
            self.engine.step()
            out.backwards += 1
            out.sums.add_micro(micro, logps=logps, n_tokens=n_tokens, tokens=batch.num_tokens)
        out.engine = watch.outcome(out.backwards)
        return out

    def _forward(self, i: int, batch, loss_fn: LossFn):
        """Micro-batch i's forward and loss: (MicroLoss, logps, n_tokens); with the router's balance
        of this very forward when the balancing loss is on."""
        if not self.router_top_k:
            logps, n_tokens = self._logps(self.engine, batch)
            return loss_fn(i, logps), logps, n_tokens
        router_logits = []
        logps, n_tokens = self._logps(self.engine, batch, router_logits=router_logits)
        return loss_fn(i, logps, micro_batch_balance(router_logits, batch, self.router_top_k)), logps, n_tokens

    def reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        return comm.all_reduce_dict(values, group=self.dp_group)


def optim_settings(cfg) -> dict:
    """The optimizer and LR schedule arguments of :func:`~megakto.distributed.engine.build_policy_engine`."""
    o = cfg.optim
    return dict(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, warmup_steps=o.warmup_steps,
                max_steps=cfg.train.max_steps, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)


class ZeroMode:
    """ZeRO 0-3 over data-parallel ranks, with AutoTP over ``dims.tp`` ranks (:class:`~megakto.runners.base.ParallelMode`)."""

    def __init__(self, setup: ModeSetup):
        self.cfg, self.dims, self.ds_config, self.dtype, self.log = (setup.cfg, setup.dims, setup.ds_config,
                                                                     setup.dtype, setup.log)

    def switch_features(self) -> None:
        if self.dims.tp > 1 and self.cfg.model.vocab_block_rows == "auto":
            self.cfg.model.vocab_block_rows = 0  # AutoTP splits the output head by vocabulary rows itself
            self.log("vocabulary blocks: off under tensor parallelism (the output head is split over "
                     f"{self.dims.tp} ranks instead)")

    def build_policy(self, load_dir: str | None):
        cfg, log = self.cfg, self.log
        model = ds_engine.load_model(cfg.model.path, self.ds_config, dtype=self.dtype,
                                     attn_implementation=cfg.model.attn_implementation,
                                     trust_remote_code=cfg.model.trust_remote_code,
                                     vocab_block_rows=cfg.model.vocab_block_rows)
        layout = vocab_layout(model)
        if layout:
            log(f"vocabulary blocks: embedding and output head in {len(layout)} blocks of {layout[0]} rows")
        if cfg.model.disable_dropout:
            ds_engine.disable_dropout(model)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.lora.r:
            model = apply_lora(model, cfg.model.lora, seed=cfg.seed)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            adapted = sorted({name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names})
            missing = sorted(set(cfg.model.lora.target_modules) - set(adapted))
            log(f"LoRA: r={cfg.model.lora.r}, alpha={cfg.model.lora.alpha:g} on {','.join(adapted)}: "
                f"{trainable:,} trainable of {total:,} parameters"
                + (f" (model.lora.target_modules {','.join(missing)}: no such module in this model)" if missing else ""))
        universal = load_dir is not None and checkpoint.resume_layout(load_dir, comm.world_size()) == "universal"
        ds_config = ds_engine.universal_load_config(self.ds_config) if universal else self.ds_config
        policy = self._engine(model, ds_config)
        policy.train()
        leaves = ds_engine.zero3_leaf_classes(policy.module)
        if leaves:  # mixture-of-experts blocks: every expert gathered on entry, whatever the routing
            log(f"ZeRO-3 leaf modules: {', '.join(leaves)}")
        with comm.fail_together(group=comm.world_group()):
            check_vocab_parallel_head(policy, self.dims.tp)
        return policy

    def _engine(self, model, ds_config: dict):
        """The policy's DeepSpeed engine around the loaded ``model``."""
        return ds_engine.build_policy_engine(model, ds_config, **optim_settings(self.cfg))

    def attach_groups(self, policy) -> ParallelDims:
        """The engine's data- and tensor-parallel groups, checked against the mesh arithmetic: megakto
        splits rows by ``dims.dp_rank`` and the engine averages gradients over its own group, so the two
        must be the same ranks."""
        dp_group, tp_group = ds_engine.parallel_groups(self.dims.tp)
        dims = self.dims.with_groups(dp=dp_group, tp=tp_group, pp=None)
        with comm.fail_together(group=comm.world_group()):
            if dims.tp > 1:
                check_groups(dims, "tp", dims.tp_group, dims.tp_group_ranks())
        self.dims = dims
        return dims

    def runner(self, policy, dims: ParallelDims, *, batcher: Batcher, logps_fn: Callable) -> ZeroRunner:
        top_k = router_top_k(model_of(policy)) if self.cfg.kto.router_aux_coef else None
        return ZeroRunner(policy, batcher=batcher, logps_fn=logps_fn, dp_group=dims.dp_group, router_top_k=top_k)

    def check_packing(self, policy, logps_fn: Callable, tokenizer, *, device) -> None:
        startup_packing_check(policy, logps_fn, self.cfg, self.dims.pp, tokenizer, dtype=self.dtype, device=device,
                              log=self.log)

    def online_reference(self, runner: ZeroRunner, *, batcher: Batcher, logps_fn: Callable):
        ref = online_reference(self.cfg.ref, self.cfg.model, self.ds_config, dtype=self.dtype, batcher=batcher,
                               logps_fn=logps_fn)
        with comm.fail_together(group=comm.world_group()):
            check_vocab_parallel_head(ref.engine, self.dims.tp)
        return ref

    def samples_off(self) -> str | None:
        return SAMPLES_OFF if self.dims.tp > 1 else None


def check_groups(dims: ParallelDims, kind: str, model_group, model_ranks: list[int]) -> None:
    """DeepSpeed's (data-parallel, ``kind``) groups must hold the ranks the mesh arithmetic says."""
    got = (comm.group_ranks(group=dims.dp_group), comm.group_ranks(group=model_group))
    want = (dims.dp_group_ranks(), model_ranks)
    if got != want:
        raise MegaktoError(f"rank {dims.rank}: DeepSpeed's (dp, {kind}) groups are {got}, the mesh "
                           f"arithmetic says {want} ({dims.describe()})")
