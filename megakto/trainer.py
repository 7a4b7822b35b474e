"""KTO training on DeepSpeed, read top to bottom as the algorithm (Ethayarajh et al. 2024).

One optimizer step over a global batch of rows (prompt x, completion y, desirable or not):

1. **No-grad pass** over this rank's micro-batches: reference log-probs of the target rows, and
   policy and reference log-probs of the mismatched KL rows (x_i, y_partner(i)); partners come from
   a seeded derangement of the whole global batch that every rank computes from dataset indices.
2. **Reference point**: the KL estimate's (sum, count) is all-reduced once over the data-parallel
   group, so z_ref = max(0, mean) is exact for the global batch however it is split (eq. 7's z_ref,
   detached). ``kto.kl_scope: microbatch`` reduces per micro-batch instead, as TRL does.
3. **Policy pass** per micro-batch with grad: eq. (7) loss, backward, ``engine.step()`` at the
   boundary. Each micro-batch loss is scaled so the update is the gradient of the mean loss over
   the global batch whatever the data-parallel size and gradient accumulation.
4. **Metrics** as sums and counts, reduced once per step, written by rank 0.

Every ``checkpoint.every_steps`` steps the policy engine and the trainer's own state are saved
atomically (megakto/checkpoint.py); ``train.resume`` continues from one with the same data stream.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from megakto import checkpoint, export
from megakto.config import Config, save_config
from megakto.data import (
    KTOBatchSampler,
    collate,
    count_labels,
    fit_to_length,
    kl_partners,
    load_rows,
    require_both_classes,
    tokenize_rows,
)
from megakto.distributed import comm, engine
from megakto.distributed.ds_config import build_ds_config, load_ds_json, reference_ds_config
from megakto.distributed.parallel import ParallelDims
from megakto.errors import ConfigError
from megakto.kto import auto_desirable_weight, check_weights, finalize_kl, kl_partial, kto_loss
from megakto.kto.reward_accuracy import reward_accuracy
from megakto.model.forward import completion_logps
from megakto.model.load import check_model_path, load_tokenizer
from megakto.runlog import RunLogger

__all__ = ["KTOTrainer", "StepResult"]


@dataclass
class StepResult:
    """One optimizer step: global (all-rank) metrics under TRL's names, and the dataset rows used."""

    step: int
    metrics: dict[str, float]
    indices: list[int]


class KTOTrainer:
    def __init__(self, cfg: Config, deepspeed_config: str):
        self.cfg = cfg
        self.step = 0
        engine.init_distributed(cfg.dist.timeout_minutes)
        self.device = engine.device()
        self.bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and engine.bf16_supported())
        # Every user-input check runs before the first training collective; all ranks fail together.
        with comm.fail_together():
            self.dims = ParallelDims(world_size=comm.world_size(), global_batch_size=cfg.train.global_batch_size,
                                     micro_batch_size=cfg.train.micro_batch_size)
            self.ds_config = build_ds_config(load_ds_json(deepspeed_config), cfg, self.dims, bf16=self.bf16,
                                             source=deepspeed_config)
            check_model_path(cfg.model.path, key="model.path", trust_remote_code=cfg.model.trust_remote_code)
            if cfg.ref.path:
                check_model_path(cfg.ref.path, key="ref.path", trust_remote_code=cfg.model.trust_remote_code)
            tok_path = cfg.model.tokenizer_path or cfg.model.path
            self.tokenizer = load_tokenizer(tok_path, key="model.tokenizer_path" if cfg.model.tokenizer_path
                                            else "model.path", trust_remote_code=cfg.model.trust_remote_code)
            self.resume_dir = checkpoint.resolve_resume(cfg.train.resume, cfg.output_dir,
                                                        world_size=comm.world_size())
        start = checkpoint.read_manifest(self.resume_dir)["step"] if self.resume_dir else 0
        self.log = RunLogger(cfg.output_dir, enabled=comm.is_main(), total_steps=cfg.train.max_steps,
                             initial_step=start)
        self.train_rows, self.eval_rows = self._setup_data()
        self.desirable_weight = self._setup_weights()
        self.sampler = KTOBatchSampler(self.train_rows["label"], global_batch_size=cfg.train.global_batch_size,
                                       num_micro_batches=self.dims.num_micro_batches, seed=cfg.seed,
                                       balanced=cfg.data.balanced_sampling)
        self.policy = self._setup_policy()
        self.reference = self._setup_reference()
        self._eval_ref_cache: dict[str, torch.Tensor] | None = None
        self.eval_history: list[tuple[int, dict[str, float]]] = []
        self.step = self._setup_resume()
        self._saved_step = self.step if self.resume_dir else None
        if comm.is_main():
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

    # ------------------------------------------------------------------ setup

    def _setup_data(self):
        """Load, validate and tokenize; local rank 0 first so the others hit the ``datasets`` cache."""
        cfg = self.cfg
        loaded = {}

        def load():
            for split, files in (("train", cfg.data.train_files), ("eval", cfg.data.eval_files)):
                if not files:
                    continue
                rows = load_rows(list(files))
                tok, report = tokenize_rows(rows, self.tokenizer, max_length=cfg.data.max_length,
                                            max_prompt_length=cfg.data.max_prompt_length, num_proc=cfg.data.num_proc)
                if split == "train":
                    n_d, n_u = count_labels(tok)
                    require_both_classes(n_d, n_u, loss_type=cfg.kto.loss_type,
                                         allow_single_class=cfg.kto.allow_single_class, source=", ".join(files))
                loaded[split] = (_Rows(tok), report)

        first = comm.local_rank() == 0
        with comm.fail_together():
            if first:
                load()
        with comm.fail_together():
            if not first:
                load()
        for split, (rows, report) in loaded.items():
            self.log.info(f"{split} data: {report.summary()}")
        train = loaded["train"][0]
        return train, loaded["eval"][0] if "eval" in loaded else None

    def _setup_weights(self) -> float:
        """eq. (8): λD·nD / (λU·nU) should lie in [1, 4/3]; ``auto`` makes it exactly 1."""
        kto = self.cfg.kto
        n_d, n_u = sum(self.train_rows["label"]), len(self.train_rows) - sum(self.train_rows["label"])
        weight = kto.desirable_weight
        if weight == "auto":
            weight = auto_desirable_weight(n_d, n_u, kto.undesirable_weight)
            self.log.info(f"kto.desirable_weight=auto -> {weight:.4f} ({n_d} desirable, {n_u} undesirable rows)")
        warning = check_weights(n_d, n_u, weight, kto.undesirable_weight)
        if warning:
            self.log.info(f"warning: {warning}")
        return float(weight)

    def _model_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def _setup_policy(self):
        cfg = self.cfg
        model = engine.load_model(cfg.model.path, self.ds_config, dtype=self._model_dtype(),
                                  attn_implementation=cfg.model.attn_implementation,
                                  trust_remote_code=cfg.model.trust_remote_code)
        if cfg.model.disable_dropout:
            engine.disable_dropout(model)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        o = cfg.optim
        policy = engine.build_policy_engine(model, self.ds_config, lr=o.lr, weight_decay=o.weight_decay,
                                            betas=tuple(o.betas), eps=o.eps, warmup_steps=o.warmup_steps,
                                            max_steps=cfg.train.max_steps, schedule=o.schedule,
                                            min_lr_ratio=o.min_lr_ratio)
        policy.train()
        return policy

    def _setup_reference(self):
        cfg = self.cfg
        ref_ds = reference_ds_config(self.ds_config, offload=cfg.ref.offload)
        model = engine.load_model(cfg.ref.path or cfg.model.path, ref_ds, dtype=self._model_dtype(),
                                  attn_implementation=cfg.model.attn_implementation,
                                  trust_remote_code=cfg.model.trust_remote_code)
        engine.disable_dropout(model)
        return engine.build_reference_engine(model, ref_ds)

    def _setup_resume(self) -> int:
        """Continue from ``self.resume_dir``: engine (weights, Adam, LR schedule), sampler position,
        RNG states, eval history; returns the step to continue from (0 = fresh start)."""
        if self.resume_dir is None:
            return 0
        with comm.fail_together():
            state = checkpoint.load_state(self.resume_dir)
            try:
                self.sampler.load_state_dict(state["sampler"])
            except ValueError as err:
                raise ConfigError(f"train.resume: {self.resume_dir}: {err}") from None
        checkpoint.load_engine(self.policy, self.resume_dir)
        checkpoint.set_rng_state(state["rng"])
        self.eval_history = [(s, dict(m)) for s, m in state["eval_history"]]
        self.log.info(f"resumed from {self.resume_dir} at step {state['step']}")
        return state["step"]

    # ------------------------------------------------------------------ training

    def train(self) -> list[StepResult]:
        cfg = self.cfg
        history = []
        self.log.info(f"training {cfg.train.max_steps} steps: {self.dims.describe()}")
        evaluating = self.eval_rows is not None
        if evaluating and cfg.train.eval_every and self.step == 0:
            self._evaluate_and_log()  # the reference model's numbers: reward accuracy 0.5 by construction
        while self.step < cfg.train.max_steps:
            result = self.train_step(self.sampler.next_global_batch())
            self.step += 1
            history.append(result)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                self.log.scalars(self.step, result.metrics)
            self.log.advance(1, loss=result.metrics["loss"], kl=result.metrics["kl"])
            if evaluating and cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self._evaluate_and_log()
            every = cfg.checkpoint.every_steps
            if every and self.step % every == 0 and self.step < cfg.train.max_steps:
                self._save_checkpoint()
        if evaluating and (not cfg.train.eval_every or self.step % cfg.train.eval_every):
            self._evaluate_and_log()
        if (cfg.checkpoint.every_steps or cfg.train.export_hf) and self._saved_step != self.step:
            self._save_checkpoint()  # the finished run: resumable with more steps, and what export_hf converts
        if cfg.train.export_hf and comm.is_main():
            self._export_hf()
        self.log.close()
        return history

    def _save_checkpoint(self) -> None:
        cfg, start = self.cfg, time.perf_counter()
        ckpt_dir = checkpoint.checkpoints_dir(cfg.output_dir)
        if comm.is_main():
            export.save_hf_base(ckpt_dir, cfg.model.path, self.tokenizer, trust_remote_code=cfg.model.trust_remote_code)
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "rng": checkpoint.rng_state(),
                 "eval_history": [[s, m] for s, m in self.eval_history]}
        path = checkpoint.save(self.policy, ckpt_dir, self.step, state, keep_last=cfg.checkpoint.keep_last,
                               dtype="bfloat16" if self.bf16 else "float32")
        self._saved_step = self.step
        self.log.info(f"saved {path} ({time.perf_counter() - start:.1f} s)")

    def _export_hf(self) -> None:
        """Rank 0 converts the final checkpoint (DeepSpeed's zero_to_fp32) into output_dir/hf; the
        other ranks do not wait, so a long conversion cannot trip the collective timeout."""
        tag_dir = os.path.join(checkpoint.checkpoints_dir(self.cfg.output_dir), checkpoint.tag_name(self.step))
        out = export.export_checkpoint(tag_dir, os.path.join(self.cfg.output_dir, "hf"),
                                       trust_remote_code=self.cfg.model.trust_remote_code)
        self.log.info(f"exported {out}")

    def _evaluate_and_log(self) -> None:
        metrics = self.evaluate()
        self.eval_history.append((self.step, metrics))
        self.log.scalars(self.step, metrics, prefix="eval/")

    def train_step(self, indices: list[int]) -> StepResult:
        cfg, kto = self.cfg, self.cfg.kto
        start = time.perf_counter()
        rows = self.train_rows.fetch(indices)
        use_kl = kto.loss_type == "kto"
        partners = kl_partners(rows["prompt_key"], seed=cfg.seed, step=self.step) if use_kl else None
        slices = self.dims.micro_batch_slices(comm.rank())

        # 1. No-grad pass: reference on targets; policy and reference on the mismatched KL rows.
        targets, ref_logps, kl_parts = [], [], []
        with torch.no_grad():
            for a, b in slices:
                batch = self._collate([(rows["prompt_ids"][i], rows["completion_ids"][i]) for i in range(a, b)])
                targets.append(batch)
                ref_logps.append(completion_logps(self.reference, batch)[0])
                if use_kl:
                    kl_batch = self._collate([self._kl_row(rows, i, partners[i]) for i in range(a, b)])
                    kl_parts.append(kl_partial(completion_logps(self.policy, kl_batch)[0],
                                               completion_logps(self.reference, kl_batch)[0]))

        # 2. The reference point z_ref: one all-reduce of (sum, count) over the data-parallel group.
        kls = self._reduce_kl(kl_parts, len(slices)) if use_kl else [torch.zeros((), device=self.device)] * len(slices)

        # 3. Policy forward/backward per micro-batch; the engine steps at the accumulation boundary.
        desirable_tokens = sum(len(rows["completion_ids"][i]) for i in range(len(indices)) if rows["label"][i])
        scale = self.dims.num_micro_batches / len(indices)  # engine: ÷ grad-accum, mean over dp ranks
        sums = _Sums()
        lr = self.policy.get_lr()[0]  # the rate this step's update uses
        for batch, ref, kl, (a, b) in zip(targets, ref_logps, kls, slices):
            desirable = torch.tensor(rows["label"][a:b], dtype=torch.bool, device=self.device)
            logps, n_tokens = completion_logps(self.policy, batch)
            out = kto_loss(logps, ref, desirable, kl, beta=kto.beta, desirable_weight=self.desirable_weight,
                           undesirable_weight=kto.undesirable_weight, loss_type=kto.loss_type)
            loss = out.losses.sum()
            nll = -(logps * desirable).sum()
            if kto.sft_weight:
                # SFT term on desirable rows: weight × mean per-token NLL over the global batch.
                loss = loss + kto.sft_weight * nll * len(indices) / max(desirable_tokens, 1)
            self.policy.backward(loss * scale)
            self.policy.step()
            sums.add_step(out.losses.detach(), out.rewards, logps.detach(), desirable, n_tokens, batch, nll.detach())
        reduced = comm.all_reduce_dict(sums.values)
        elapsed = time.perf_counter() - start
        metrics = _step_metrics(reduced, kl=float(torch.stack([k.float() for k in kls]).mean()), elapsed=elapsed,
                                sft_weight=kto.sft_weight, desirable_tokens=desirable_tokens)
        metrics["learning_rate"] = lr
        grad_norm = self.policy.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return StepResult(self.step, metrics, list(indices))

    def _reduce_kl(self, parts: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[torch.Tensor]:
        """Step scope: one (sum, count) over all micro-batches and ranks. Micro-batch scope: one
        (sum, count) per micro-batch position, summed over ranks (TRL's granularity)."""
        flat = torch.stack([torch.stack(p) for p in parts]).to(torch.float64).cpu()  # (n, 2)
        if self.cfg.kto.kl_scope == "step":
            total = comm.all_reduce_sum(flat.sum(0))
            return [finalize_kl(total[0], total[1]).to(self.device)] * n
        comm.all_reduce_sum(flat)
        return [finalize_kl(s, c).to(self.device) for s, c in flat]

    def _kl_row(self, rows, i: int, j: int):
        """Prompt i with completion j, cut to ``max_length`` the same way target rows are."""
        data = self.cfg.data
        max_prompt = data.max_prompt_length if data.max_prompt_length is not None else data.max_length // 2
        fitted = fit_to_length(rows["prompt_ids"][i], rows["completion_ids"][j], data.max_length, max_prompt)
        assert fitted is not None, "max_prompt_length < max_length leaves room for a completion token"
        return fitted

    def _collate(self, pairs):
        return collate(pairs, pad_id=self.tokenizer.pad_token_id).to(self.device)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, KL, reward accuracy and margin. Rows are spread over data-parallel ranks;
        every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively), the
        last chunk padded with row 0 at weight 0."""
        rows, kto = self.eval_rows, self.cfg.kto
        n = len(rows)
        everything = rows.fetch(list(range(n)))
        partners = kl_partners(everything["prompt_key"], seed=self.cfg.seed, step=0) if kto.loss_type == "kto" else None
        dp, rank, eb = self.dims.dp, comm.rank(), self.cfg.train.eval_batch_size
        chunks = math.ceil(n / (dp * eb))
        cached = self._eval_ref_cache is not None
        ref_cache = self._eval_ref_cache or {"target": torch.zeros(n, dtype=torch.float64),
                                             "kl": torch.zeros(n, dtype=torch.float64)}
        policy = torch.zeros(n, dtype=torch.float64)
        policy_kl = torch.zeros(n, dtype=torch.float64)
        for c in range(chunks):
            lo = (c * dp + rank) * eb
            ids = [i for i in range(lo, lo + eb) if i < n]
            real = len(ids)
            ids += [0] * (eb - real)
            batch = self._collate([(everything["prompt_ids"][i], everything["completion_ids"][i]) for i in ids])
            policy[ids[:real]] = completion_logps(self.policy, batch)[0][:real].double().cpu()
            if not cached:
                ref_cache["target"][ids[:real]] = completion_logps(self.reference, batch)[0][:real].double().cpu()
            if partners is not None:
                kl_batch = self._collate([self._kl_row(everything, i, partners[i]) for i in ids])
                policy_kl[ids[:real]] = completion_logps(self.policy, kl_batch)[0][:real].double().cpu()
                if not cached:
                    ref_cache["kl"][ids[:real]] = completion_logps(self.reference, kl_batch)[0][:real].double().cpu()
        # Each row was filled on exactly one rank; summing assembles the full vectors everywhere.
        stacked = comm.all_reduce_sum(torch.stack([policy, policy_kl] + ([] if cached else
                                                                          [ref_cache["target"], ref_cache["kl"]])))
        policy, policy_kl = stacked[0], stacked[1]
        if not cached:
            ref_cache = {"target": stacked[2], "kl": stacked[3]}
            self._eval_ref_cache = ref_cache
        kl = finalize_kl(*kl_partial(policy_kl, ref_cache["kl"])) if partners is not None else torch.zeros(())
        desirable = torch.tensor(everything["label"], dtype=torch.bool)
        out = kto_loss(policy, ref_cache["target"], desirable, kl.double(), beta=kto.beta,
                       desirable_weight=self.desirable_weight, undesirable_weight=kto.undesirable_weight,
                       loss_type=kto.loss_type)
        acc = reward_accuracy(out.rewards, everything["label"], everything["prompt_key"])
        return {"loss": float(out.losses.mean()), "kl": float(kl), "reward_accuracy": acc.accuracy,
                "rewards/margins": acc.margin, "pairs": float(acc.pairs)}


class _Rows:
    """A tokenized split: labels and prompt keys in memory, token ids fetched per batch from Arrow."""

    def __init__(self, ds):
        self.ds = ds
        self.label = [bool(x) for x in ds["label"]]
        self.prompt_key = list(ds["prompt_key"])

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, column: str):
        return getattr(self, column)

    def fetch(self, indices: list[int]) -> dict[str, list]:
        picked = self.ds.select_columns(["prompt_ids", "completion_ids"])[list(indices)]
        return {"prompt_ids": picked["prompt_ids"], "completion_ids": picked["completion_ids"],
                "label": [self.label[i] for i in indices], "prompt_key": [self.prompt_key[i] for i in indices]}


class _Sums:
    """Per-rank sums and counts for one step; reduced once, then divided (exact global means)."""

    def __init__(self):
        self.values: dict[str, float] = {k: 0.0 for k in (
            "loss", "rows", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected",
            "count_chosen", "count_rejected", "target_tokens", "tokens", "nll_chosen")}

    def add_step(self, losses, rewards, logps, desirable, n_tokens, batch, nll) -> None:
        v, d = self.values, desirable.float()
        v["loss"] += float(losses.sum())
        v["rows"] += len(desirable)
        v["rewards_chosen"] += float((rewards * d).sum())
        v["rewards_rejected"] += float((rewards * (1 - d)).sum())
        v["logps_chosen"] += float((logps * d).sum())
        v["logps_rejected"] += float((logps * (1 - d)).sum())
        v["count_chosen"] += float(d.sum())
        v["count_rejected"] += float((1 - d).sum())
        v["target_tokens"] += float(n_tokens.sum())
        v["tokens"] += batch.num_tokens
        v["nll_chosen"] += float(nll)


def _step_metrics(s: dict[str, float], *, kl: float, elapsed: float, sft_weight: float,
                  desirable_tokens: int) -> dict[str, float]:
    def mean(num: str, den: str) -> float:
        return s[num] / s[den] if s[den] else float("nan")

    m = {"loss": s["loss"] / s["rows"], "kl": kl,
         "rewards/chosen": mean("rewards_chosen", "count_chosen"),
         "rewards/rejected": mean("rewards_rejected", "count_rejected"),
         "logps/chosen": mean("logps_chosen", "count_chosen"),
         "logps/rejected": mean("logps_rejected", "count_rejected"),
         "count/chosen": s["count_chosen"], "count/rejected": s["count_rejected"],
         "tokens_per_s": s["target_tokens"] / elapsed, "samples_per_s": s["rows"] / elapsed}
    if s["count_chosen"] and s["count_rejected"]:
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    if sft_weight:
        m["sft_nll"] = s["nll_chosen"] / max(desirable_tokens, 1)
        m["loss"] += sft_weight * m["sft_nll"]
    return m
