"""KTO training on DeepSpeed, read top to bottom as the algorithm (Ethayarajh et al. 2024).

One optimizer step over a global batch of rows (prompt x, completion y, desirable or not):

1. **Plan**: every rank derives, from dataset indices alone, the mismatched KL row of each example
   (x_i with another example's completion, never one sharing x_i's prompt) and the split of the
   global batch into equal-row, near-equal-token micro-batches (data-parallel rank r owns
   micro-batches r·ga .. r·ga+ga−1). Each micro-batch's sequences are packed end to end.
2. **No-grad pass** over this rank's micro-batches: reference log-probs of target and KL rows
   (one packed forward, or a cache lookup), policy log-probs of the KL rows.
3. **Reference point**: the KL estimate's (sum, count) is all-reduced once over the data-parallel
   group, so z_ref = max(0, mean) is exact for the global batch however it is split (eq. 7's z_ref,
   detached). ``kto.kl_scope: microbatch`` reduces per micro-batch instead, as TRL does.
4. **Policy pass** per micro-batch with grad: eq. (7) loss, backward, ``engine.step()`` at the
   boundary. Each micro-batch loss is scaled so the update is the gradient of the mean loss over
   the global batch whatever the data-parallel size and gradient accumulation. A step whose KL,
   loss or gradient norm is not finite is skipped and counted (megakto/skipped_steps.py); too many
   in a row stop the run without saving.
5. **Metrics** as sums and counts, reduced once per step, written by rank 0.

The passes of steps 2 and 4 run through the parallel mode's runner (megakto/runners/): one forward,
backward and step per micro-batch on a ZeRO or ZeRO + AutoTP engine, or ``eval_batch`` and one
``train_batch`` (1F1B) on a ``deepspeed.pipe`` engine, eq. (7) then evaluated on the last stage.

Every ``checkpoint.every_steps`` steps the policy engine and the trainer's own state are saved
atomically (megakto/checkpoint.py); ``train.resume`` continues from one with the same data stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch

from megakto import checkpoint, export, resume
from megakto.config import Config, save_config
from megakto.data import KTOBatchSampler
from megakto.data.kl_pairs import dataset_kl_partners
from megakto.data.packing import pack, pad_rows
from megakto.data.step_plan import StepPlan
from megakto.data.split import TokenizedSplit
from megakto.distributed import comm, engine
from megakto.distributed.vocab_parallel import group_reducers
from megakto.errors import MegaktoError
from megakto.evaluate import Evaluator
from megakto.health import HealthMonitor, HealthThresholds
from megakto.kto import finalize_kl, kl_partial, kto_loss, nll_share, raw_kl
from megakto.metrics import reference_point_metrics, step_metrics
from megakto.model.forward import logps_function
from megakto.model.load import load_tokenizer, padding_note
from megakto.model.lora import ADAPTER_DIR
from megakto.model.vocab_blocks import vocab_layout
from megakto.peak_memory import PeakMemory, reduce_peaks
from megakto.reference.build import build_reference
from megakto.reference.scorers import AdapterOffReference
from megakto.reference.sequences import ConcatSequences, SplitSequences
from megakto.runlog import Phases, RunLogger
from megakto.runners import ModeSetup, parallel_mode
from megakto.runners.base import MicroLoss, model_of
from megakto.samples import SampleWriter, generate, sample_prompts
from megakto.skipped_steps import SkippedSteps, TooManySkippedSteps
from megakto.startup import check_run, desirable_weight, load_splits, log_splits, make_sampler, step_planner

__all__ = ["KTOTrainer", "StepResult"]


@dataclass
class StepResult:
    """One optimizer step: global (all-rank) metrics under TRL's names, the dataset rows used, and
    why the step left the weights unchanged (None when it was applied)."""

    step: int
    metrics: dict[str, float]
    indices: list[int]
    skipped: str | None = None


class KTOTrainer:
    def __init__(self, cfg: Config, deepspeed_config: str):
        self.cfg = cfg
        self.step = 0
        self._previous_raw_kl: float | None = None  # kl/raw of the last step, for kl/raw_change
        self.phases = Phases()  # start-up seconds per phase, logged once the run is set up
        engine.init_distributed(cfg.dist.timeout_minutes)
        self.device = engine.device()
        self.bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and engine.bf16_supported())
        # Every user-input check runs before the first training collective; all ranks fail together.
        with comm.fail_together(group=comm.world_group()):
            checked = check_run(cfg, deepspeed_config, world_size=comm.world_size(), rank=comm.rank(), bf16=self.bf16,
                                on_gpu=engine.on_gpu())
            # The mesh: world = dp × tp × pp; its process groups are attached once the policy engine exists.
            self.dims, self.ds_config, attn = checked.dims, checked.ds_config, checked.attn
            tok_path = cfg.model.tokenizer_path or cfg.model.path
            self.tokenizer = load_tokenizer(tok_path, key="model.tokenizer_path" if cfg.model.tokenizer_path
                                            else "model.path", trust_remote_code=cfg.model.trust_remote_code)
        with comm.fail_together(group=comm.world_group()):  # its own block: verifying a checkpoint is collective
            self.resume_dir = checkpoint.resolve_resume(cfg.train.resume, cfg.output_dir, world_size=comm.world_size(),
                                                        tp_size=self.dims.tp, pp_size=self.dims.pp)
        start = checkpoint.read_manifest(self.resume_dir)["step"] if self.resume_dir else 0
        self.log = RunLogger(cfg.output_dir, enabled=comm.is_main(), total_steps=cfg.train.max_steps,
                             initial_step=start)
        self.log.info(f"attention: {attn} (model.attn_implementation={cfg.model.attn_implementation})")
        for note in checked.notes:
            self.log.info(note)
        cfg.model.attn_implementation = attn  # what both models load, and the reference cache fingerprints
        cfg.model.logps = checked.logps  # auto resolved for the family
        # The parallel mode (megakto/runners/) builds the engines and turns off what it does not combine with.
        self.mode = parallel_mode(ModeSetup(cfg, self.dims, self.ds_config, self._model_dtype(), self.log.info))
        self.mode.switch_features()
        self.log.info(f"parallelism: {self.dims.describe()}")
        self.log.info(f"process group: {comm.describe(group=comm.world_group())} "
                      f"(dist.timeout_minutes={cfg.dist.timeout_minutes:g})")
        self.phases.done("checks")
        self.train_rows, self.eval_rows = self._setup_data()
        self.phases.done("data")
        self.use_kl = cfg.kto.loss_type == "kto"
        with comm.fail_together(group=comm.world_group()):
            self.desirable_weight = self._setup_weights()
            self.sampler = self._setup_sampler()
            self.planner = step_planner(cfg, self.dims, self.train_rows)  # the dry run's too
        self.phases.done("sampler")
        self.resume_state, self.load_dir = self._prepare_resume()
        self.phases.done("resume")  # with the universal conversion when the world size changed
        # Peak memory is measured from here: what the engines, the reference and the steps add.
        self.peak_memory = PeakMemory(engine.on_gpu())
        self.policy = self.mode.build_policy(self.load_dir)
        self.dims = self.mode.attach_groups(self.policy)
        self.logps_fn = logps_function(cfg.model.logps, cfg.model.logps_chunk_tokens, attn=attn,
                                       reducers=group_reducers(self.dims.tp_group))
        # How the policy's passes run: per micro-batch (ZeRO, TP) or through the pipeline schedule.
        self.runner = self.mode.runner(self.policy, self.dims, batch_fn=self._batch, logps_fn=self.logps_fn)
        # Every rank scores the same rows (collective forwards): all pass or all fail.
        with comm.fail_together(group=comm.world_group()):
            self.mode.check_packing(self.policy, self.logps_fn, self.tokenizer, device=self.device)
        self.phases.done("policy")
        with comm.fail_together(group=comm.world_group()):
            self.evaluator = self._setup_evaluator()
        self.phases.done("evaluator")
        self.reference = self._setup_reference()
        self.phases.done("reference")
        self.samples = self._setup_samples()
        self.health = (HealthMonitor(HealthThresholds(**dataclasses.asdict(cfg.health)), grad_clip=cfg.optim.grad_clip,
                                     kl_checks=self.use_kl) if cfg.train.health_checks else None)
        self.eval_history: list[tuple[int, dict[str, float]]] = []
        self.step = self._setup_resume()
        self.phases.done("resume")
        self._saved_step = self.step if self.resume_dir else None
        if comm.is_main():
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        self.log.info(self.phases.summary())

    # ------------------------------------------------------------------ setup

    def _setup_data(self):
        """Load, validate and tokenize; local rank 0 first so the others hit the ``datasets`` cache."""
        note = padding_note(self.tokenizer)
        if note:
            self.log.info(note)
        first, loaded = comm.local_rank() == 0, {}
        with comm.fail_together(group=comm.world_group()), comm.others_wait(
                "local rank 0 of each node reads and tokenizes the data", self.log.info):
            if first:
                loaded = load_splits(self.cfg, self.tokenizer)
        with comm.fail_together(group=comm.world_group()):
            if not first:
                loaded = load_splits(self.cfg, self.tokenizer)
        log_splits(loaded, self.log.info)  # the timing is local rank 0's: the first to read and tokenize
        return loaded["train"][0], loaded["eval"][0] if "eval" in loaded else None

    def _setup_weights(self) -> float:
        return desirable_weight(self.cfg, self.train_rows, self.log.info)

    def _model_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def _setup_sampler(self) -> KTOBatchSampler:
        return make_sampler(self.cfg, self.train_rows)

    def _setup_evaluator(self) -> Evaluator | None:
        if self.eval_rows is None or self.cfg.kto.loss_type == "sft":
            return None
        partners = dataset_kl_partners(self.eval_rows.prompt_key) if self.use_kl else None
        return Evaluator(self.eval_rows, self._sequences(self.eval_rows, partners), has_kl=self.use_kl,
                         dp_rank=self.dims.dp_rank,
                         dp_size=self.dims.dp, dp_group=self.dims.dp_group, batch_size=self.cfg.train.eval_batch_size)

    def _setup_reference(self):
        """None for sft; else the scorer of reference log-probs (megakto/reference/build.py): a frozen
        ZeRO-3 inference engine, or a content-keyed cache filled once, sharded over the ranks (when
        it already holds every sequence, the reference model is never loaded)."""
        cfg = self.cfg
        if cfg.kto.loss_type == "sft":
            return None

        def online():
            same_weights = os.path.abspath(cfg.ref.path or cfg.model.path) == os.path.abspath(cfg.model.path)
            if cfg.model.lora.r and same_weights:  # π_ref is the base model: the adapters switched off
                self.log.info("reference: the policy with its LoRA adapters off (no second model)")
                return AdapterOffReference(self.policy, self._batch, self.logps_fn)
            return self.mode.online_reference(self.runner, batch_fn=self._batch, logps_fn=self.logps_fn)

        # The precompute is split over the data-parallel ranks: each tensor- or sequence-parallel group
        # (or pipeline) scores the same rows together, and its first rank writes them.
        return build_reference(cfg.ref, cfg.model, dtype=self._model_dtype(), online=online,
                               sequences=self._reference_sequences, batch_size=cfg.train.eval_batch_size,
                               dp_rank=self.dims.dp_rank, dp_size=self.dims.dp, dp_group=self.dims.dp_group,
                               writes=self.dims.tp_rank == 0 and self.dims.pp_rank == 0 and self.dims.sp_rank == 0,
                               device=self.device,
                               log=self.log.info)

    def _setup_samples(self):
        """The fixed held-out prompts of ``train.eval_samples`` and rank 0's writer, or None (off)."""
        k = self.cfg.train.eval_samples
        if not k or self.evaluator is None:
            return None
        off = self.mode.samples_off()
        if off:
            self.log.info(off)
            return None
        return sample_prompts(self.eval_rows, k), SampleWriter(self.cfg.output_dir, self.tokenizer)

    def _write_samples(self) -> None:
        """Greedy completions of the sample prompts from the policy and the reference (every rank takes
        part: ZeRO-3 gathers in every forward); rank 0 writes them. A cached reference has no model,
        so its column stays empty."""
        prompts, writer = self.samples
        tok, n = self.tokenizer, self.cfg.train.sample_max_new_tokens

        def run(module):
            return generate(module, prompts, max_new_tokens=n, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                            device=self.device, synced=comm.world_size() > 1)

        policy = run(model_of(self.policy))
        ref_engine = getattr(self.reference, "engine", None)
        reference = run(model_of(ref_engine)) if ref_engine is not None else None
        if isinstance(self.reference, AdapterOffReference):
            with model_of(self.policy).disable_adapter():
                reference = run(model_of(self.policy))
        if comm.is_main():
            records = writer.write(self.step, prompts, policy, reference)
            self.log.text("samples", SampleWriter.markdown(records), self.step)

    def _reference_sequences(self) -> ConcatSequences:
        """Every (prompt_ids, completion_ids) the run scores with the reference: train and eval
        targets and KL rows, as keys and lengths (token ids stay in the Arrow tables)."""
        parts = [self._sequences(self.train_rows, self.planner.kl_partner)]
        if self.evaluator is not None:
            parts.append(self.evaluator.sequences)
        return ConcatSequences(parts)

    def _prepare_resume(self) -> tuple[dict | None, str | None]:
        """Before the policy is built: the saved trainer state and the folder DeepSpeed is to load
        (megakto/resume.py; None, None: a fresh start); the sampler's position is restored."""
        return resume.prepare(self.resume_dir, self.cfg, tp=self.dims.tp, sampler=self.sampler, log=self.log.info)

    def _setup_resume(self) -> int:
        """Once the policy exists: engine, RNG states and eval history from the checkpoint; the step to
        continue from (0 = fresh start)."""
        if self.resume_state is None:
            return 0
        self.eval_history = resume.restore(self.resume_state, self.resume_dir, self.load_dir, self.policy, self.cfg,
                                           log=self.log.info)
        return self.resume_state["step"]

    # ------------------------------------------------------------------ training

    def train(self) -> list[StepResult]:
        cfg = self.cfg
        history = []
        # Skipped steps (non-finite loss, KL or gradient norm) are counted; too many in a row stop
        # the run before anything is saved, so the last checkpoint stays the last good state.
        skips = SkippedSteps(cfg.train.max_skipped_steps, hint=f"optim.lr={cfg.optim.lr:g}, kto.beta={cfg.kto.beta:g}")
        save_due = False
        self.log.info(f"training {cfg.train.max_steps} steps: {self.dims.describe()}")
        evaluating = self.evaluator is not None
        if evaluating and cfg.train.eval_every and self.step == 0:
            self._evaluate_and_log()  # the reference model's numbers: reward accuracy 0.5 by construction
        while self.step < cfg.train.max_steps:
            result = self.next_step()
            history.append(result)
            stop = warning = None
            try:  # every rank records the same all-reduced outcome, so all decide alike
                warning = skips.record(self.step, result.skipped)
            except TooManySkippedSteps as err:
                stop = err
            result.metrics["train/skipped_steps"] = float(skips.total)
            if warning:
                self.log.info(warning)
            if result.skipped:
                self.log.info(f"step {self.step} skipped: {result.skipped}; skipped_steps {skips.total}")
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps or stop:
                peaks = reduce_peaks(self.peak_memory, group=comm.world_group())
                result.metrics.update(peaks.metrics(engine.on_gpu()))
                self.log.scalars(self.step, result.metrics)
            self.log.advance(1, loss=result.metrics["loss"], kl=result.metrics["kl"],
                             tok_s=result.metrics.get("tokens_per_s", float("nan")))
            if self.health is not None:
                # A one-class micro-batch changes z_ref only when each micro-batch has its own (kl_scope=microbatch).
                per_micro = self.use_kl and cfg.kto.kl_scope == "microbatch" and cfg.train.micro_batch_size > 1
                one_class = result.metrics.get("count/single_class_micro_batches", 0) if per_micro else 0
                for line in self.health.step(self.step, result.metrics, single_class_micro_batches=int(one_class)):
                    self.log.warning(line, step=self.step)
            if stop is not None:
                stop.shared = True
                self.log.close()
                raise stop  # before any save: the checkpoints on disk predate the skipped steps
            if evaluating and cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self._evaluate_and_log()
            every = cfg.checkpoint.every_steps
            save_due = save_due or bool(every and self.step % every == 0)
            # A save due during skipped steps waits for the next applied one.
            if save_due and not skips.consecutive and self.step < cfg.train.max_steps:
                self._save_checkpoint()
                save_due = False
        evaluated_last = bool(self.eval_history) and self.eval_history[-1][0] == self.step
        if evaluating and not evaluated_last:
            self._evaluate_and_log()
        if (cfg.checkpoint.every_steps or cfg.train.export_hf) and self._saved_step != self.step:
            self._save_checkpoint()  # the finished run: resumable with more steps, and what export_hf converts
        # The last collective of the run: before rank 0's export, which the other ranks do not wait for.
        peak = reduce_peaks(self.peak_memory, group=comm.world_group())
        if cfg.train.export_hf and comm.is_main():
            self._export_hf()
        self.log.info(f"run finished at step {self.step}: {peak.describe(engine.on_gpu())}")
        self.log.close()
        return history

    def _save_checkpoint(self) -> None:
        cfg, start = self.cfg, time.perf_counter()
        ckpt_dir = checkpoint.checkpoints_dir(cfg.output_dir)
        if comm.is_main():
            lora = model_of(self.policy).peft_config["default"] if cfg.model.lora.r else None
            export.save_hf_base(ckpt_dir, cfg.model.path, self.tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                                lora=lora)
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "rng": checkpoint.rng_state(),
                 "vocab_layout": vocab_layout(model_of(self.policy)),
                 "param_shapes": resume.held_shapes(model_of(self.policy)),
                 "eval_history": [[s, m] for s, m in self.eval_history]}
        path = checkpoint.save(self.policy, ckpt_dir, self.step, state, keep_last=cfg.checkpoint.keep_last,
                               dtype="bfloat16" if self.bf16 else "float32", tp_size=self.dims.tp,
                               pp_size=self.dims.pp, log=self.log.info)
        self._saved_step = self.step
        self.log.info(f"saved {path} ({time.perf_counter() - start:.1f} s)")

    def _export_hf(self) -> None:
        """Rank 0 converts the final checkpoint (DeepSpeed's zero_to_fp32) into output_dir/hf; the
        other ranks do not wait, so a long conversion cannot trip the collective timeout."""
        tag_dir = os.path.join(checkpoint.checkpoints_dir(self.cfg.output_dir), checkpoint.tag_name(self.step))
        adapter = os.path.join(self.cfg.output_dir, ADAPTER_DIR) if self.cfg.model.lora.r else None
        out = export.export_checkpoint(tag_dir, os.path.join(self.cfg.output_dir, "hf"), adapter_dir=adapter,
                                       trust_remote_code=self.cfg.model.trust_remote_code)
        self.log.info(f"exported {out}" + (f" (merged) and the adapter to {adapter}" if adapter else ""))

    def evaluate(self) -> dict[str, float]:
        kto = self.cfg.kto
        return self.evaluator(lambda pairs: self.runner.score([pairs])[0], self.reference.logps, beta=kto.beta,
                              desirable_weight=self.desirable_weight, undesirable_weight=kto.undesirable_weight,
                              loss_type=kto.loss_type)

    # ------------------------------------------------------------------ for tools (tools/bench.py)

    def next_step(self) -> StepResult:
        """One optimizer step on the sampler's next global batch, the step counter advanced: what
        :meth:`train` does per step, without its logging, evaluation and checkpoints."""
        result = self.train_step(self.sampler.next_global_batch())
        self.step += 1
        return result

    def completion_lengths(self) -> list[int]:
        """Tokens in each training row's completion, in dataset order (after filtering)."""
        return self.train_rows.column_lengths("completion_ids").tolist()

    @property
    def precompute_seconds(self) -> float:
        """Seconds spent at setup filling the reference cache; 0 when online or already complete."""
        return getattr(self.reference, "precompute_seconds", 0.0)

    def _evaluate_and_log(self) -> None:
        metrics = self.evaluate()
        self.eval_history.append((self.step, metrics))
        self.log.scalars(self.step, metrics, prefix="eval/")
        if self.samples is not None:
            self._write_samples()
        if self.health is not None:
            for line in self.health.evaluated(self.eval_history):
                self.log.warning(line, step=self.step)

    def train_step(self, indices: list[int]) -> StepResult:
        kto = self.cfg.kto
        start = time.perf_counter()
        # 1. Plan (megakto/data/step_plan.py): KL rows; equal rows and near-equal tokens per micro-batch.
        plan = self.planner.plan(indices, self.step)
        rows, targets, kl_rows = plan.rows, plan.targets, plan.kl_rows
        mine = self._my_micro_batches(plan)

        # 2. No-grad pass: reference on target (and KL) rows; policy on the KL rows.
        t_rows = [[targets[i] for i in positions] for positions in mine]
        k_rows = [[kl_rows[i] for i in positions] for positions in mine] if kl_rows is not None else None
        ref_logps, kl_parts = [None] * len(mine), []
        if self.reference is not None:  # sft: no reference
            with torch.no_grad():
                both = self.reference.score([t + (k_rows[j] if k_rows else []) for j, t in enumerate(t_rows)])
                ref_logps = [b[:len(t)] for b, t in zip(both, t_rows)]
                if k_rows:
                    policy_kl = self.runner.score(k_rows)
                    kl_parts = [kl_partial(p, b[len(t):]) for p, b, t in zip(policy_kl, both, t_rows)]

        # 3. The reference point z_ref: one all-reduce of (sum, count) over the data-parallel group.
        zero = torch.zeros((), device=self.device)
        kl_sums = self._reduce_kl(kl_parts, len(mine)) if kl_rows is not None else None
        kls = [finalize_kl(*p).to(self.device) for p in kl_sums] if kl_sums else [zero] * len(mine)
        # z_ref is all-reduced: every rank sees the same value and takes the same decision.
        skipped = None if all(math.isfinite(float(k)) for k in kls) else "non-finite KL reference point z_ref"

        # 4. Policy forward/backward per micro-batch (eq. 7); the engine steps at the accumulation boundary.
        scale = self.dims.num_micro_batches / len(indices)  # engine: ÷ grad-accum, mean over dp ranks
        target_tokens = sum(len(c) for _, c in targets)
        desirable_tokens = sum(len(c) for (_, c), d in zip(targets, rows["label"]) if d)

        def micro_loss(j: int, logps: torch.Tensor) -> MicroLoss:
            """Micro-batch j's loss, a sum over its rows like eq. (7)'s; ``scale`` makes it a global mean."""
            desirable = torch.tensor([rows["label"][i] for i in mine[j]], dtype=torch.bool, device=logps.device)
            if kto.loss_type == "sft":
                return MicroLoss(nll_share(logps, target_tokens) * len(indices), logps.detach() * 0,
                                 torch.zeros_like(logps), desirable)
            out = kto_loss(logps, ref_logps[j], desirable, kls[j], beta=kto.beta, desirable_weight=self.desirable_weight,
                           undesirable_weight=kto.undesirable_weight, loss_type=kto.loss_type)
            loss = out.losses.sum()
            if kto.sft_weight:
                loss = loss + kto.sft_weight * nll_share(logps, desirable_tokens, desirable) * len(indices)
            return MicroLoss(loss, out.losses, out.rewards, desirable, out.slopes)

        outcome = self.runner.train(t_rows, micro_loss, scale=scale, skipped=skipped)
        sums, backwards, poisoned, skipped = outcome.sums, outcome.backwards, outcome.poisoned, outcome.skipped

        # 5. Metrics: one reduction of sums and counts.
        # Tensor-parallel peers and pipeline stages hold the same rows: each row is counted once.
        reduced = self.runner.reduce_sums(sums.values)
        kl_mean = float(torch.stack([k.float() for k in kls]).mean())
        if reduced["rows"]:
            metrics = step_metrics(reduced, kl=kl_mean, elapsed=time.perf_counter() - start,
                                   loss_type=kto.loss_type, sft_weight=kto.sft_weight)
            if kl_sums:
                metrics.update(reference_point_metrics(
                    [float(raw_kl(*p)) for p in kl_sums], beta=kto.beta, previous_raw=self._previous_raw_kl,
                    mean_abs_reward=reduced["abs_rewards"] / reduced["rows"]))
                self._previous_raw_kl = metrics["kl/raw"]
        else:  # skipped before the policy pass
            metrics = {"loss": float("nan"), "kl": kl_mean}
        metrics["learning_rate"] = outcome.engine.lr  # the rate this step's update used
        if backwards:  # the engine reached the accumulation boundary and ran its optimizer step
            norm = outcome.engine.grad_norm
            if norm is not None:
                metrics["grad_norm"] = norm
            # The engine discarded the update (DeepSpeed's overflow check, the same on every rank).
            if outcome.engine.skipped:
                skipped = skipped or f"non-finite gradient norm ({norm}), update discarded by DeepSpeed"
            elif poisoned or (norm is not None and not math.isfinite(norm)):
                err = MegaktoError(
                    f"step {self.step + 1}: the optimizer applied a non-finite gradient (norm {norm}), so the weights "
                    "are no longer finite; stopped without saving. Keep DeepSpeed's overflow check on "
                    "(bf16.check_grad_overflow, zero_optimization.compute_grad_norm) and lower optim.lr or kto.beta")
                err.shared = True
                raise err
        return StepResult(self.step, metrics, list(indices), skipped)

    def _reduce_kl(self, parts: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[torch.Tensor]:
        """The (sum, count) of KL log-ratios behind each of this rank's n micro-batches. Step scope:
        one (sum, count) over all micro-batches and ranks. Micro-batch scope: one per micro-batch
        position, summed over ranks (TRL's granularity)."""
        flat = torch.stack([torch.stack(p) for p in parts]).to(torch.float64).cpu()  # (n, 2)
        group = self.dims.dp_group  # tensor-parallel peers hold the same rows: count each once
        if self.cfg.kto.kl_scope == "step":
            return [comm.all_reduce_sum(flat.sum(0), group=group)] * n
        comm.all_reduce_sum(flat, group=group)
        return list(flat)

    def _my_micro_batches(self, plan: StepPlan) -> list[list[int]]:
        """This data-parallel rank's micro-batches of the step's plan (positions into the batch);
        the ranks of one tensor-parallel group or pipeline get the same ones."""
        return plan.mine(self.dims.dp_rank)

    def _sequences(self, split: TokenizedSplit, partners) -> SplitSequences:
        data = self.cfg.data
        return SplitSequences(split, partners, max_length=data.max_length, max_prompt_length=data.max_prompt_length)

    def _batch(self, pairs):
        pad_id = self.tokenizer.pad_token_id
        batch = pack(pairs, self.cfg.data.max_tokens_per_row, pad_id) if self.cfg.data.packing else pad_rows(pairs, pad_id)
        return batch.to(self.device)
