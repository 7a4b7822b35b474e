"""KTO training on DeepSpeed, read top to bottom as the algorithm (Ethayarajh et al. 2024).

One optimizer step over a global batch of rows (prompt x, completion y, desirable or not):

1. **Plan**: every rank derives, from dataset indices alone, the mismatched KL row of each example
   (x_i with another example's completion, never one sharing x_i's prompt) and the split of the
   global batch into equal-row, near-equal-token micro-batches (data-parallel rank r owns
   micro-batches r·ga .. r·ga+ga−1). Each micro-batch's sequences are packed end to end
   (megakto/data/batcher.py, the same batcher for every engine of the run and for the dry run).
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

Steps 1-5 are :class:`megakto.step.KTOStep`, which the trainer builds once from its parts (the plan,
the runner, the reference, the loss settings) and calls every step; this module sets those parts up
and runs the loop around them (logging, evaluation, checkpoints). The passes of steps 2 and 4 run
through the parallel mode's runner (megakto/runners/): one forward, backward and step per
micro-batch on a ZeRO or ZeRO + AutoTP engine, or ``eval_batch`` and one ``train_batch`` (1F1B) on
a ``deepspeed.pipe`` engine, eq. (7) then evaluated on the last stage.

Every ``checkpoint.every_steps`` steps the policy engine and the trainer's own state are saved
atomically (megakto/checkpoint/); ``train.resume`` continues from one with the same data stream.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import nullcontext

import torch

from megakto.checkpoint import CheckpointManager
from megakto.config import Config, save_config
from megakto.data import KTOBatchSampler
from megakto.data.batcher import Batcher
from megakto.data.kl_pairs import dataset_kl_partners
from megakto.data.split import TokenizedSplit
from megakto.distributed import comm, engine
from megakto.distributed.vocab_parallel import group_reducers
from megakto.evaluate import Evaluator
from megakto.health import HealthMonitor, HealthThresholds
from megakto.model.forward import logps_function
from megakto.model.load import load_tokenizer, padding_note
from megakto.peak_memory import PeakMemory, reduce_peaks
from megakto.reference.build import build_reference
from megakto.reference.scorers import AdapterOffReference
from megakto.reference.sequences import ConcatSequences, SplitSequences
from megakto.runlog import Phases, RunLogger
from megakto.runners import ModeSetup, parallel_mode
from megakto.run_clock import RunClock
from megakto.samples import eval_samples, planned_cost
from megakto.skipped_steps import SkippedSteps, TooManySkippedSteps
from megakto.startup import check_run, desirable_weight, load_splits, log_splits, make_sampler, step_planner
from megakto.step import KTOStep, LossSettings, StepResult

__all__ = ["KTOTrainer", "StepResult"]


class KTOTrainer:
    def __init__(self, cfg: Config, deepspeed_config: str):
        self.cfg = cfg
        self.step = 0
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
        # train.resume resolved and verified on every rank; the manager logs to the run's log, opened next.
        self.checkpoints = CheckpointManager(cfg, self.dims, dtype=self._model_dtype(),
                                             log=lambda line: self.log.info(line))
        self.log = RunLogger(cfg.output_dir, enabled=comm.is_main(), total_steps=cfg.train.max_steps,
                             initial_step=self.checkpoints.start_step)
        self.log.info(f"attention: {attn} (model.attn_implementation={cfg.model.attn_implementation})")
        for note in checked.notes:
            self.log.info(note)
        cfg.model.attn_implementation = attn  # what both models load, and the reference cache fingerprints
        cfg.model.logps = checked.logps  # auto resolved for the family
        cfg.kto.router_aux_coef = checked.router_aux_coef  # null resolved from the model config
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
        # Before the policy exists: the saved trainer state, the sampler's position, the folder to load.
        load_dir = self.checkpoints.prepare(self.sampler)
        self.phases.done("resume")  # with the universal conversion when the world size changed
        # Peak memory is measured from here: what the engines, the reference and the steps add.
        self.peak_memory = PeakMemory(engine.on_gpu())
        self.policy = self.mode.build_policy(load_dir)
        self.dims = self.mode.attach_groups(self.policy)
        self.logps_fn = logps_function(cfg.model.logps, cfg.model.logps_chunk_tokens, attn=attn,
                                       reducers=group_reducers(self.dims.tp_group))
        # Each micro-batch's pairs -> packed (or padded) model input, for every engine of the run.
        self.batcher = Batcher.for_run(cfg.data, self.tokenizer.pad_token_id, self.device)
        # How the policy's passes run: per micro-batch (ZeRO, TP) or through the pipeline schedule.
        self.runner = self.mode.runner(self.policy, self.dims, batcher=self.batcher, logps_fn=self.logps_fn)
        # Every rank scores the same rows (collective forwards): all pass or all fail.
        with comm.fail_together(group=comm.world_group()):
            start = time.perf_counter()
            self.mode.check_packing(self.policy, self.logps_fn, self.tokenizer, device=self.device)
            self.phases.note("policy", f"packing check {time.perf_counter() - start:.2f} s on 4 fixed sequences")
        self.phases.done("policy")
        with comm.fail_together(group=comm.world_group()):
            self.evaluator = self._setup_evaluator()
        self.phases.done("evaluator")
        self.reference = self._setup_reference()
        self.phases.done("reference")
        # One optimizer step (megakto/step.py), built from the parts above.
        self.step_fn = KTOStep(planner=self.planner, runner=self.runner, reference=self.reference, dims=self.dims,
                               loss=LossSettings.from_config(cfg.kto, self.desirable_weight), device=self.device)
        cost = planned_cost(cfg, deepspeed_config, self.train_rows, world_size=comm.world_size(),
                            on_gpu=engine.on_gpu())
        self.samples = eval_samples(cfg, self.eval_rows, self.tokenizer, evaluating=self.evaluator is not None,
                                    off=self.mode.samples_off(), device=self.device, log=self.log.info, cost=cost)
        self.phases.done("samples plan")
        self.health = (HealthMonitor(HealthThresholds(**dataclasses.asdict(cfg.health)), grad_clip=cfg.optim.grad_clip,
                                     kl_checks=self.use_kl, router_aux_coef=cfg.kto.router_aux_coef)
                       if cfg.train.health_checks else None)
        # Skipped steps (non-finite loss, KL or gradient norm) are counted; too many in a row stop
        # the run before anything is saved, so the last checkpoint stays the last good state.
        self.skips = SkippedSteps(cfg.train.max_skipped_steps,
                                  hint=f"optim.lr={cfg.optim.lr:g}, kto.beta={cfg.kto.beta:g}")
        # What a resume continues besides the engine: the skipped-step counts and the health windows.
        self.carried = {"skipped_steps": self.skips, **({"health": self.health} if self.health else {})}
        # Once it exists: engine, RNG states, eval history and the carried counts from the checkpoint
        # (step 0: a fresh start).
        self.step, self.eval_history = self.checkpoints.resume(self.policy, carried=self.carried)
        self.phases.done("resume")
        if comm.is_main():
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        self.clock = RunClock()  # where the run's time goes: steps, evaluations, samples, the final phase
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
        for split, (_, report, _) in loaded.items():
            self.phases.note("data", f"{split} tokenizer checks {report.check_seconds:.2f} s on {report.checked:,} of "
                             f"{report.n_rows:,} rows, a decode of {report.n_decoded}")
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
                return AdapterOffReference(self.policy, self.batcher, self.logps_fn)
            return self.mode.online_reference(self.runner, batcher=self.batcher, logps_fn=self.logps_fn)

        # The precompute is split over the data-parallel ranks: each tensor- or sequence-parallel group
        # (or pipeline) scores the same rows together, and its first rank writes them.
        return build_reference(cfg.ref, cfg.model, dtype=self._model_dtype(), online=online,
                               sequences=self._reference_sequences, batch_size=cfg.train.eval_batch_size,
                               dp_rank=self.dims.dp_rank, dp_size=self.dims.dp, dp_group=self.dims.dp_group,
                               writes=self.dims.first_of_replica,
                               device=self.device,
                               log=self.log.info)

    def _reference_sequences(self) -> ConcatSequences:
        """Every (prompt_ids, completion_ids) the run scores with the reference: train and eval
        targets and KL rows, as keys and lengths (token ids stay in the Arrow tables)."""
        parts = [self._sequences(self.train_rows, self.planner.kl_partner)]
        if self.evaluator is not None:
            parts.append(self.evaluator.sequences)
        return ConcatSequences(parts)

    # ------------------------------------------------------------------ training

    def train(self) -> list[StepResult]:
        cfg = self.cfg
        history = []
        skips = self.skips
        save_due = False
        self.log.info(f"training {cfg.train.max_steps} steps: {self.dims.describe()}")
        self.clock.start()
        evaluating = self.evaluator is not None
        if evaluating and cfg.train.eval_every and self.step == 0:
            self._evaluate_and_log()  # the reference model's numbers: reward accuracy 0.5 by construction
        while self.step < cfg.train.max_steps:
            with self.clock.timed("step"):
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
            last = self.step == cfg.train.max_steps  # its evaluation belongs to the final phase, below
            if evaluating and cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and not last:
                self._evaluate_and_log()
            every = cfg.checkpoint.every_steps
            save_due = save_due or bool(every and self.step % every == 0)
            # A save due during skipped steps waits for the next applied one.
            if save_due and not skips.consecutive and self.step < cfg.train.max_steps:
                self._save_checkpoint()
                save_due = False
        evaluated_last = bool(self.eval_history) and self.eval_history[-1][0] == self.step
        self.log.info(self.clock.steps_summary())
        final_eval = evaluating and not evaluated_last
        final_save = (bool(cfg.checkpoint.every_steps or cfg.train.export_hf)
                      and self.checkpoints.saved_step != self.step)
        self.log.info(self._final_plan(final_eval, final_save))
        if final_eval:
            self._evaluate_and_log(final=True)
        if final_save:  # the finished run: resumable with more steps, and what export_hf converts
            with self.clock.final_part("checkpoint"):
                self._save_checkpoint()
            self.clock.final["hashing"] = self.checkpoints.last_save.get("hashing", 0.0)
        # The last collective of the run: before rank 0's export, which the other ranks do not wait for.
        peak = reduce_peaks(self.peak_memory, group=comm.world_group())
        if cfg.train.export_hf and comm.is_main():
            with self.clock.final_part("export"):
                self.checkpoints.export_hf(self.step)  # rank 0 alone: the others do not wait
        if self.clock.final:
            self.log.info(self.clock.final_summary())
        self.log.info(f"run finished at step {self.step}: {peak.describe(engine.on_gpu())}")
        snapshot = self.peak_memory.dump_history(comm.rank())
        if snapshot:
            self.log.info(f"memory history of rank {comm.rank()}: {snapshot} (tools/cuda_memory_peak.py reads it)")
        elif self.peak_memory.history_dir and comm.is_main():
            self.log.info("MEGAKTO_CUDA_MEMORY_HISTORY: not recorded on CPU (tools/memory_timeline.py --rss gives "
                          "each phase's peak there)")
        self.log.close()
        return history

    def _save_checkpoint(self) -> None:
        self.checkpoints.save(self.policy, self.step, sampler=self.sampler, eval_history=self.eval_history,
                              tokenizer=self.tokenizer, carried=self.carried)

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

    def _final_plan(self, final_eval: bool, final_save: bool) -> str:
        """What the final phase runs, each part asked for by the config."""
        parts = []
        if final_eval:
            parts.append(f"evaluation of {len(self.eval_rows):,} rows (data.eval_files)")
            if self.samples is not None:
                parts.append(f"eval samples of {len(self.samples.prompts)} prompts (train.eval_samples)")
        if final_save:
            why = "checkpoint.every_steps" if self.cfg.checkpoint.every_steps else "train.export_hf"
            parts.append(f"checkpoint of step {self.step}, sha256 of every file ({why})")
        if self.cfg.train.export_hf:
            parts.append("export to output_dir/hf on rank 0 (train.export_hf)")
        return "final phase: " + ("; ".join(parts) if parts else "nothing to run")

    def _evaluate_and_log(self, final: bool = False) -> None:
        with self.clock.timed("eval"), self.clock.final_part("evaluation") if final else nullcontext():
            start = time.perf_counter()
            metrics = self.evaluate()
            eval_s = time.perf_counter() - start
        self.eval_history.append((self.step, metrics))
        self.log.scalars(self.step, metrics, prefix="eval/")
        samples_s = None
        if self.samples is not None:
            with self.clock.timed("samples"), self.clock.final_part("samples") if final else nullcontext():
                start = time.perf_counter()
                self.samples(self.step, self.policy, self.reference, self.log)
                samples_s = time.perf_counter() - start
        line, timing = self.clock.evaluation(self.step, eval_s, samples_s)
        self.log.scalars(self.step, timing, quiet=True)
        self.log.info(line)
        if self.health is not None:
            for line in self.health.evaluated(self.eval_history):
                self.log.warning(line, step=self.step)

    def train_step(self, indices: list[int]) -> StepResult:
        """One optimizer step on the global batch ``indices`` (megakto/step.py): plan, no-grad pass,
        KL reduce, eq. (7) loss, backward and step, metrics."""
        return self.step_fn(indices, self.step)

    def _sequences(self, split: TokenizedSplit, partners) -> SplitSequences:
        data = self.cfg.data
        return SplitSequences(split, partners, max_length=data.max_length, max_prompt_length=data.max_prompt_length)
