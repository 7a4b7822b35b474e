"""The pipeline mode (``deepspeed.pipe``, ZeRO 0/1): the policy and the online reference as pipeline
engines over the same stages, and the KTO step on them. The embedding and the output head are
stages of their own (vocabulary blocks off), generation needs the whole model (eval samples off),
the packing check does not apply (no single forward) and neither does ``ref.offload``.

The engine owns the schedule, so a step is two kinds of calls:

* no-grad passes (the policy on KL rows, a frozen reference pipeline on target and KL rows, the
  evaluator, the cache precompute): ``eval_batch`` over all of the rank's micro-batches at once,
  so the stages overlap; the last stage's (S,) log-probs are then broadcast over the pipeline
  group, which is all the ranks of one data-parallel replica need to reduce the KL estimate
  (every stage then knows z_ref) and to evaluate;
* the policy pass: one ``train_batch`` (1F1B: forward and backward interleaved over the
  micro-batches, the optimizer step at the end). The loss function, called on the last stage per
  micro-batch, evaluates eq. (7) from the micro-batch's log-probs and returns one tensor (the
  engine's output reduction cannot take a tuple); it also keeps the rows' losses, rewards and
  log-probs as metric sums, which :meth:`PipelineRunner.reduce_sums` totals.

A micro-batch travels as ``((input_ids, position_ids, completion_mask, segment_ids), (index,))``:
the first stage reads the inputs, the last the micro-batch's position in the step, by which the
loss function finds its reference log-probs, labels and z_ref.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from megakto import checkpoint
from megakto.data.batcher import Batcher
from megakto.distributed import comm, engine as ds_engine
from megakto.distributed.ds_config import reference_ds_config
from megakto.model.forward import completion_token_counts, for_attention
from megakto.model.packing_check import startup_packing_check
from megakto.distributed.parallel import ParallelDims
from megakto.runners.base import SAMPLES_OFF, EngineWatch, LossFn, ModeSetup, Pairs, TrainOutcome
from megakto.runners.zero import check_groups, optim_settings

__all__ = ["LossSlot", "PipelineMode", "PipelineRunner", "PipelineReference", "check_model", "pipeline_model",
           "describe_stages", "online_reference"]


class LossSlot:
    """The pipeline module's ``loss_fn``: calls whatever the runner set for the current pass."""

    def __init__(self):
        self.fn: Callable | None = None

    def __call__(self, outputs, labels):
        return self.fn(outputs, labels)


class PipelineRunner:
    """``engine``: a pipeline engine whose module's loss function is ``slot``. ``dp_group``,
    ``pp_group``: this rank's data-parallel and pipeline groups; ``last``: the global rank of this
    pipeline's last stage; ``attn``: the stages' attention implementation."""

    def __init__(self, engine, slot: LossSlot, *, batcher: Batcher, dp_group: comm.ProcessGroup,
                 pp_group: comm.ProcessGroup, last: int, attn: str):
        self.engine, self._slot = engine, slot
        self._batch = batcher  # pairs -> PackedBatch on the device
        self.dp_group, self.pp_group, self.last = dp_group, pp_group, last
        self._attn = attn  # the resolved attention implementation decides the rows' layout

    def _micro_batch(self, pairs: Pairs, index: int):
        batch = for_attention(self._batch(pairs), self._attn)
        inputs = (batch.input_ids, batch.position_ids, batch.completion_mask, batch.segment_ids)
        return (inputs, (torch.tensor([index]),)), batch

    def _broadcast(self, outputs: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
        """The last stage's per-batch log-probs on every stage of the pipeline."""
        # Every stage gets its copy on its own device (the cache and the KL reduce use the same one).
        flat = torch.cat(outputs).float() if outputs else torch.zeros(sum(sizes), device=self.engine.device)
        comm.broadcast_tensor(flat, src=self.last, group=self.pp_group)
        return list(flat.split(sizes))

    @torch.no_grad()
    def score(self, batches: list[Pairs], engine=None) -> list[torch.Tensor]:
        """Log-probs of each batch through ``engine`` (default: the policy), every rank of the pipeline."""
        engine = engine or self.engine
        if not batches:
            return []
        collected: list[torch.Tensor] = []

        def keep(logps, labels):
            collected.append(logps.detach())
            return logps.detach().sum()

        engine.module.loss_fn.fn = keep
        items = [self._micro_batch(pairs, i)[0] for i, pairs in enumerate(batches)]
        engine.eval_batch(iter(items), compute_loss=True, reduce_output=None, bcast_loss=False,
                          num_micro_batches=len(items))
        return self._broadcast(collected, [len(p) for p in batches])

    def train(self, batches: list[Pairs], loss_fn: LossFn, *, scale: float, skipped: str | None) -> TrainOutcome:
        out, watch = TrainOutcome(skipped=skipped), EngineWatch(self.engine)
        if skipped is not None:
            out.engine = watch.outcome(0)
            return out  # nothing ran: the engine has no partial step to drop
        items, packed = zip(*(self._micro_batch(pairs, i) for i, pairs in enumerate(batches)))
        non_finite = []

        def kto(logps, labels):
            i = int(labels[0])
            micro = loss_fn(i, logps)
            if not math.isfinite(float(micro.loss.detach())):
                non_finite.append(i)
            out.sums.add_micro(micro, logps=logps, n_tokens=completion_token_counts(packed[i]),
                               tokens=packed[i].num_tokens)
            return micro.loss * scale

        self._slot.fn = kto
        self.engine.train_batch(iter(items))
        out.backwards = len(items)
        # One decision for every rank: a non-finite loss was back-propagated on some last stage, so the
        # step's gradient is not finite and DeepSpeed's overflow check has to discard the update.
        if comm.any_rank(bool(non_finite), group=comm.world_group()):
            out.skipped, out.poisoned = "non-finite loss", True
        out.engine = watch.outcome(out.backwards)
        return out

    def reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """Only the last stage holds rows: summed over the pipeline (the others add zeros), then over
        the data-parallel replicas."""
        return comm.all_reduce_dict(comm.all_reduce_dict(values, group=self.pp_group), group=self.dp_group)


class PipelineReference:
    """``ref.mode=online`` under pipelines: a frozen pipeline engine over the same stages (its own
    module, no optimizer), run through the policy runner's ``eval_batch`` path."""

    def __init__(self, engine, runner: PipelineRunner):
        self.engine, self._runner = engine, runner

    def score(self, batches: list[Pairs]) -> list[torch.Tensor]:
        return self._runner.score(batches, engine=self.engine)

    def logps(self, pairs: Pairs) -> torch.Tensor:
        return self.score([pairs])[0]

    def release(self) -> None:
        """Done with this scorer (the cache precompute's): let its engine be freed with it."""
        ds_engine.release_engine(self.engine)


def check_model(path: str, pp: int, *, key: str, trust_remote_code: bool = False) -> None:
    """Before any engine: the model at ``path`` can be cut into ``pp`` pipeline stages."""
    from transformers import AutoConfig

    from megakto.model.pipeline_stages import check_pipeline_model

    check_pipeline_model(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), pp, key=key)


def pipeline_model(path: str, pp: int, *, dtype: torch.dtype, model, partition: str):
    """The ``PipelineModule`` of the model at ``path`` (``model``: the config's model section), this
    rank's stages loaded from its safetensors files, the loss function a :class:`LossSlot`."""
    from megakto.model.pipeline_stages import StageSource, stage_specs

    attn = None if model.attn_implementation == "auto" else model.attn_implementation
    source = StageSource(path, dtype=dtype, attn_implementation=attn, trust_remote_code=model.trust_remote_code,
                         chunk_tokens=model.logps_chunk_tokens)
    module = ds_engine.build_pipeline_module(stage_specs(source), num_stages=pp, partition=partition,
                                             loss_fn=LossSlot(), activation_checkpointing=model.gradient_checkpointing)
    module.config = source.config  # the HF config, for whoever reads the module's (e.g. tp_merge shapes)
    if model.disable_dropout:
        ds_engine.disable_dropout(module)
    return module


def describe_stages(engine) -> str:
    """``stage s: layers a-b`` for every stage, from the module's partition."""
    parts = engine.module.parts
    return "; ".join(f"stage {s}: layers {parts[s]}-{parts[s + 1] - 1}" for s in range(len(parts) - 1))


def online_reference(ref, model, policy_ds: dict, runner: PipelineRunner, pp: int, *, dtype: torch.dtype,
                     partition: str) -> PipelineReference:
    """The reference weights (``ref.path``, else ``model.path``) as a frozen pipeline with the policy's
    partition. ZeRO-3 parameter offload does not combine with pipelines, so ``ref.offload`` does not
    apply: each stage holds its layers of the reference in device memory (``ref.mode=cache``: none)."""
    module = pipeline_model(ref.path or model.path, pp, dtype=dtype, model=model, partition=partition)
    return PipelineReference(ds_engine.build_reference_engine(module, reference_ds_config(policy_ds, pipeline=True)),
                             runner)


class PipelineMode:
    """``dims.pp`` pipeline stages per data-parallel replica (:class:`~megakto.runners.base.ParallelMode`)."""

    def __init__(self, setup: ModeSetup):
        self.cfg, self.dims, self.ds_config, self.dtype, self.log = (setup.cfg, setup.dims, setup.ds_config,
                                                                     setup.dtype, setup.log)

    def switch_features(self) -> None:
        if self.cfg.model.vocab_block_rows == "auto":
            self.cfg.model.vocab_block_rows = 0  # the embedding and the head sit on their own pipeline stages
            self.log("vocabulary blocks: off under pipeline parallelism (the embedding and the output head "
                     "are stages of their own)")

    def build_policy(self, load_dir: str | None):
        cfg = self.cfg
        module = pipeline_model(cfg.model.path, self.dims.pp, dtype=self.dtype, model=cfg.model,
                                partition=cfg.parallel.pp_partition)
        # A universal folder (another data-parallel size or pipeline layout): DeepSpeed's universal load.
        universal = load_dir is not None and checkpoint.resume_layout(load_dir, comm.world_size()) == "universal"
        ds_config = ds_engine.universal_load_config(self.ds_config) if universal else self.ds_config
        policy = ds_engine.build_policy_engine(module, ds_config, **optim_settings(cfg))
        self.log(f"pipeline: {describe_stages(policy)}")
        return policy

    def attach_groups(self, policy) -> ParallelDims:
        """The engine's data-parallel and pipeline groups, checked against the mesh arithmetic."""
        dp_group, pp_group = ds_engine.pipeline_groups(policy)
        dims = self.dims.with_groups(dp=dp_group, tp=None, pp=pp_group)
        with comm.fail_together(group=comm.world_group()):
            check_groups(dims, "pp", dims.pp_group, dims.pp_group_ranks())
        self.dims = dims
        return dims

    def runner(self, policy, dims: ParallelDims, *, batcher: Batcher, logps_fn: Callable) -> PipelineRunner:
        return PipelineRunner(policy, policy.module.loss_fn, batcher=batcher, dp_group=dims.dp_group,
                              pp_group=dims.pp_group, last=dims.pp_group_ranks()[-1],
                              attn=self.cfg.model.attn_implementation)

    def check_packing(self, policy, logps_fn: Callable, tokenizer, *, device) -> None:
        startup_packing_check(policy, logps_fn, self.cfg, self.dims.pp, tokenizer, dtype=self.dtype, device=device,
                              log=self.log)

    def online_reference(self, runner: PipelineRunner, *, batcher: Batcher, logps_fn: Callable):
        """A second, frozen pipeline over the same stages."""
        cfg = self.cfg
        if cfg.ref.offload != "none":
            self.log(f"ref.offload={cfg.ref.offload} does not apply under pipeline parallelism (parameter "
                     "offload needs ZeRO-3): each stage holds its reference layers in device memory; "
                     "ref.mode=cache holds none")
        return online_reference(cfg.ref, cfg.model, self.ds_config, runner, self.dims.pp, dtype=self.dtype,
                                partition=cfg.parallel.pp_partition)

    def samples_off(self) -> str | None:
        return SAMPLES_OFF
