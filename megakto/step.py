"""One KTO optimizer step (Ethayarajh et al. 2024), built from its parts: the step plan, the
parallel mode's runner, the reference scorer and the loss settings.

plan -> no-grad pass (reference on target and KL rows, policy on KL rows) -> one all-reduce of the
KL estimate's (sum, count) over the data-parallel group (eq. 7's z_ref) -> eq. (7) loss, backward
and the engine's step through the runner -> metrics from one reduction of sums and counts.

Nothing here knows how the engine runs (megakto/runners/) or where the reference log-probs come
from (megakto/reference/): the trainer (megakto/trainer.py) builds a :class:`KTOStep` from them
once and calls it every step, and a unit test builds one from a fake runner and reference
(tests/test_step.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from megakto.data.context_ids import scored_tokens
from megakto.data.step_plan import StepPlan, StepPlanner
from megakto.distributed import comm
from megakto.distributed.parallel import ParallelDims
from megakto.errors import MegaktoError
from megakto.kto import RouterBalance, finalize_kl, kl_partial, kto_loss, nll_share, raw_kl
from megakto.metrics import reference_point_metrics, step_metrics, weight_metrics
from megakto.reference.scorers import Reference
from megakto.runners.base import MicroLoss, StepRunner

__all__ = ["KTOStep", "LossSettings", "StepResult", "with_router_aux"]


@dataclass
class StepResult:
    """One optimizer step: global (all-rank) metrics under TRL's names, the dataset rows used, and
    why the step left the weights unchanged (None when it was applied)."""

    step: int
    metrics: dict[str, float]
    indices: list[int]
    skipped: str | None = None


@dataclass(frozen=True)
class LossSettings:
    """The config's ``kto`` section as the step reads it, with λ_D of eq. (8) resolved."""

    loss_type: str
    beta: float
    desirable_weight: float
    undesirable_weight: float
    sft_weight: float = 0.0
    kl_scope: str = "step"
    router_aux_coef: float = 0.0  # the router's balancing loss (megakto/kto/router_aux.py); 0 = off

    @classmethod
    def from_config(cls, kto, desirable_weight: float) -> "LossSettings":
        return cls(kto.loss_type, kto.beta, desirable_weight, kto.undesirable_weight, kto.sft_weight, kto.kl_scope,
                   kto.router_aux_coef or 0.0)


def with_router_aux(micro: MicroLoss, router: RouterBalance | None, coef: float, rows_per_micro: float) -> MicroLoss:
    """``micro`` with the router's balancing loss added: coef · aux once per micro-batch.

    A micro-batch's loss is a sum over its rows, which the backward scales by 1 / rows per
    micro-batch (the step's ``scale``); the engine then averages over accumulation steps and
    data-parallel ranks. Adding coef · aux · rows per micro-batch therefore puts coef · aux into the
    gradient once per micro-batch, and the step's update follows coef × the mean aux over all of its
    micro-batches, however they are spread over ranks and accumulation steps: the same weighting
    transformers' Trainer gives a forward's aux loss under gradient accumulation. (aux is not a sum
    over rows: its f_e · P_e product is taken over one forward's tokens, so it is not split by row.)
    """
    if router is None:
        if coef:
            raise MegaktoError(f"kto.router_aux_coef={coef:g}, but this mode's policy pass gave no router logits; "
                               "set kto.router_aux_coef=0")
        return micro
    return micro._replace(loss=micro.loss + coef * rows_per_micro * router.loss.to(micro.loss.dtype), router=router)


class KTOStep:
    """``planner``: the run's step plan; ``runner``: the policy's passes; ``reference``: the scorer
    of reference log-probs (None for sft); ``dims``: the mesh, groups attached; ``device``: where
    the KL reference point lives."""

    def __init__(self, *, planner: StepPlanner, runner: StepRunner, reference: Reference | None, dims: ParallelDims,
                 loss: LossSettings, device):
        self.planner, self.runner, self.reference = planner, runner, reference
        self.dims, self.loss, self.device = dims, loss, device
        self.previous_raw_kl: float | None = None  # kl/raw of the last step, for kl/raw_change

    def __call__(self, indices: list[int], step: int) -> StepResult:
        """Optimizer step ``step + 1`` on the global batch ``indices`` (every rank passes the same)."""
        kto = self.loss
        start = time.perf_counter()
        # 1. Plan (megakto/data/step_plan.py): KL rows; equal rows and near-equal tokens per micro-batch.
        plan = self.planner.plan(indices, step)
        rows, targets = plan.rows, plan.targets
        mine = self.micro_batches(plan)

        # 2. No-grad pass: reference on target (and KL) rows; policy on the KL rows.
        t_rows, k_rows = plan.pairs(mine)
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
        kl_sums = self.reduce_kl(kl_parts, len(mine)) if plan.kl_rows is not None else None
        kls = [finalize_kl(*p).to(self.device) for p in kl_sums] if kl_sums else [zero] * len(mine)
        # z_ref is all-reduced: every rank sees the same value and takes the same decision.
        skipped = None if all(math.isfinite(float(k)) for k in kls) else "non-finite KL reference point z_ref"

        # 4. Policy forward/backward per micro-batch (eq. 7); the engine steps at the accumulation boundary.
        scale = self.dims.num_micro_batches / len(indices)  # engine: ÷ grad-accum, mean over dp ranks
        target_tokens = sum(scored_tokens(c) for _, c in targets)
        desirable_tokens = sum(scored_tokens(c) for (_, c), d in zip(targets, rows["label"]) if d)

        def micro_loss(j: int, logps: torch.Tensor, router: RouterBalance | None = None) -> MicroLoss:
            """Micro-batch j's loss, a sum over its rows like eq. (7)'s; ``scale`` makes it a global mean.
            ``router``: the balancing loss of this micro-batch's forward (kto.router_aux_coef > 0)."""
            desirable = torch.tensor([rows["label"][i] for i in mine[j]], dtype=torch.bool, device=logps.device)
            # Per-row weights scale every term of their row; z_ref stays unweighted (megakto/kto/loss.py).
            weights = (torch.tensor([rows["weight"][i] for i in mine[j]], dtype=torch.float32, device=logps.device)
                       if "weight" in rows else None)
            if kto.loss_type == "sft":
                micro = MicroLoss(nll_share(logps, target_tokens, weights=weights) * len(indices), logps.detach() * 0,
                                  torch.zeros_like(logps), desirable)
            else:
                out = kto_loss(logps, ref_logps[j], desirable, kls[j], beta=kto.beta,
                               desirable_weight=kto.desirable_weight, undesirable_weight=kto.undesirable_weight,
                               loss_type=kto.loss_type, weights=weights)
                loss = out.losses.sum()
                if kto.sft_weight:
                    loss = loss + kto.sft_weight * nll_share(logps, desirable_tokens, desirable,
                                                             weights) * len(indices)
                micro = MicroLoss(loss, out.losses, out.rewards, desirable, out.slopes)
            return with_router_aux(micro, router, kto.router_aux_coef, 1 / scale)

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
                    [float(raw_kl(*p)) for p in kl_sums], beta=kto.beta, previous_raw=self.previous_raw_kl,
                    mean_abs_reward=reduced["abs_rewards"] / reduced["rows"]))
                self.previous_raw_kl = metrics["kl/raw"]
            if "weight" in rows:  # known on the host for the whole global batch: nothing to reduce
                metrics.update(weight_metrics(rows["label"], rows["weight"]))
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
                    f"step {step + 1}: the optimizer applied a non-finite gradient (norm {norm}), so the weights "
                    "are no longer finite; stopped without saving. Keep DeepSpeed's overflow check on "
                    "(bf16.check_grad_overflow, zero_optimization.compute_grad_norm) and lower optim.lr or kto.beta")
                err.shared = True
                raise err
        return StepResult(step, metrics, list(indices), skipped)

    def reduce_kl(self, parts: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[torch.Tensor]:
        """The (sum, count) of KL log-ratios behind each of this rank's n micro-batches. Step scope:
        one (sum, count) over all micro-batches and ranks. Micro-batch scope: one per micro-batch
        position, summed over ranks (TRL's granularity)."""
        flat = torch.stack([torch.stack(p) for p in parts]).to(torch.float64).cpu()  # (n, 2)
        group = self.dims.dp_group  # tensor-parallel peers hold the same rows: count each once
        if self.loss.kl_scope == "step":
            return [comm.all_reduce_sum(flat.sum(0), group=group)] * n
        comm.all_reduce_sum(flat, group=group)
        return list(flat)

    def micro_batches(self, plan: StepPlan) -> list[list[int]]:
        """This data-parallel rank's micro-batches of the step's plan (positions into the batch);
        the ranks of one tensor-parallel group or pipeline get the same ones."""
        return plan.mine(self.dims.dp_rank)
