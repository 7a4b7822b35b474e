"""The plan of one optimizer step, from dataset indices alone: the trainer runs it on every rank
and the dry run (``launch/train_kto.py --dry-run``) logs it, through the same :meth:`StepPlanner.plan`.

A global batch of rows is paired with its KL rows (x_i with another example's completion) and split
into ``num_micro_batches`` equal-row, near-equal-token micro-batches; data-parallel rank r owns
micro-batches r·ga .. r·ga+ga−1 (ga: gradient accumulation), and the ranks of one tensor-parallel
group or pipeline get the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from megakto.data.kl_pairs import fit_kl_row, kl_partners
from megakto.data.packing import plan_micro_batches
from megakto.data.split import TokenizedSplit

__all__ = ["StepPlan", "StepPlanner"]


@dataclass(frozen=True)
class StepPlan:
    """One step: the fetched ``rows`` of ``indices``, their (prompt_ids, completion_ids)
    ``targets``, their KL rows (None without a KL term) and every rank's ``micro_batches``
    (positions into the batch, data-parallel rank-major)."""

    indices: list[int]
    rows: dict
    targets: list
    kl_rows: list | None
    micro_batches: list[list[int]]
    grad_accum: int

    def mine(self, dp_rank: int) -> list[list[int]]:
        """Data-parallel rank ``dp_rank``'s micro-batches."""
        ga = self.grad_accum
        return self.micro_batches[dp_rank * ga:(dp_rank + 1) * ga]

    def pairs(self, micro_batches: list[list[int]]) -> tuple[list[list], list[list] | None]:
        """The (prompt_ids, completion_ids) pairs of ``micro_batches`` (positions into the batch):
        their targets, and their KL rows (None without a KL term), one list per micro-batch."""
        targets = [[self.targets[i] for i in positions] for positions in micro_batches]
        if self.kl_rows is None:
            return targets, None
        return targets, [[self.kl_rows[i] for i in positions] for positions in micro_batches]


@dataclass(frozen=True)
class StepPlanner:
    """``rows``: the training split; ``use_kl``: KL rows are drawn (``kto.loss_type: kto``);
    ``kl_partner``: each row's fixed dataset-level partner (cached reference), else None and the
    partners are drawn over each global batch, seeded by ``seed`` and the step."""

    rows: TokenizedSplit
    num_micro_batches: int
    grad_accum: int
    use_kl: bool
    kl_partner: list[int] | None
    seed: int
    max_length: int
    max_prompt_length: int

    def plan(self, indices: list[int], step: int) -> StepPlan:
        rows = self.rows.fetch(indices)
        targets = list(zip(rows["prompt_ids"], rows["completion_ids"]))
        kl_rows = self.kl_rows(indices, rows, step) if self.use_kl else None
        lengths = [len(p) + len(c) for p, c in targets]
        if kl_rows is not None:
            lengths = [n + len(p) + len(c) for n, (p, c) in zip(lengths, kl_rows)]
        plan = plan_micro_batches(lengths, rows["label"], self.num_micro_batches)
        return StepPlan(list(indices), rows, targets, kl_rows, plan, self.grad_accum)

    def kl_rows(self, indices: list[int], rows: dict, step: int) -> list:
        """The KL rows of one global batch. Online reference: partners drawn over this global batch,
        seeded by the step. Cached reference (``kl_partner``): each row's fixed dataset-level partner."""

        def fit(p, c):
            return fit_kl_row(p, c, self.max_length, self.max_prompt_length)

        if self.kl_partner is None:
            # Drawn over the batch in dataset-index order, so the pairs (and z_ref) depend on which
            # rows the step holds, not on how the sampler arranged them for a micro-batch size.
            order = sorted(range(len(indices)), key=lambda i: (indices[i], i))
            drawn = kl_partners([rows["prompt_key"][i] for i in order], seed=self.seed, step=step)
            partners = [0] * len(indices)
            for k, j in enumerate(drawn):
                partners[order[k]] = order[j]
            return [fit(rows["prompt_ids"][i], rows["completion_ids"][j]) for i, j in enumerate(partners)]
        partner_completions = self.rows.fetch([self.kl_partner[i] for i in indices])["completion_ids"]
        return [fit(p, c) for p, c in zip(rows["prompt_ids"], partner_completions)]
