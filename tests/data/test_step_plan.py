"""The dry run plans what the trainer runs: both take one global batch through
:meth:`megakto.data.step_plan.StepPlanner.plan` from :func:`megakto.startup.step_planner`. Each
path is run on the same 24 rows (the trainer's step, :class:`megakto.step.KTOStep`, against the
fake runner and reference of tests/_step_fakes.py, which record the pairs they are handed) and the
micro-batches of every data-parallel rank compared, pair by pair."""

import pytest
import torch
from datasets import Dataset

from megakto.config import load_config
from megakto.data.batcher import Batcher
from megakto.data.split import TokenizedSplit
from megakto.data.step_plan import StepPlanner
from megakto.distributed import comm
from megakto.distributed.parallel import ParallelDims
from megakto.dry_run import first_steps
from megakto.startup import make_sampler, step_planner
from megakto.step import KTOStep, LossSettings
from tests._step_fakes import FakeReference, FakeRunner

ROWS = 24


def _split() -> TokenizedSplit:
    """Rows of varied lengths, 6 prompts, both classes."""
    prompts = [[1 + i % 6] * (2 + i % 5) for i in range(ROWS)]
    completions = [[20 + i] * (1 + (7 * i) % 9) for i in range(ROWS)]
    labels = [i % 3 != 0 for i in range(ROWS)]
    ds = Dataset.from_dict({"prompt_ids": prompts, "completion_ids": completions, "label": labels,
                            "prompt_key": [i % 6 for i in range(ROWS)]})
    return TokenizedSplit(ds)


def _trainer_share(cfg, dims, split, indices, step):
    """The target and KL pairs of each micro-batch that the trainer's step hands to the runner as
    data-parallel rank ``dims.dp_rank``'s (one process: the reductions over its group are no-ops)."""
    batcher = Batcher.for_run(cfg.data, pad_id=0)
    runner = FakeRunner(torch.zeros(64), batcher=batcher, dp_group=comm.world_group())
    reference = FakeReference(torch.zeros(64), batcher=batcher)
    kto_step = KTOStep(planner=step_planner(cfg, dims, split), runner=runner, reference=reference,
                       dims=dims.with_groups(dp=comm.world_group(), tp=None, pp=None),
                       loss=LossSettings.from_config(cfg.kto, 1.0), device="cpu")
    kto_step(indices, step)
    (targets,), (kl,) = runner.trained, runner.scored
    assert reference.scored == [[t + k for t, k in zip(targets, kl)]]  # one reference pass over both
    return targets, kl


@pytest.mark.parametrize("ref_mode", ["online", "cache"])
def test_the_dry_run_plans_what_the_trainer_runs(ref_mode, monkeypatch):
    cfg = load_config(None, ["model.path=unused", "data.train_files=unused", "train.global_batch_size=8",
                             "train.micro_batch_size=2", f"ref.mode={ref_mode}", "data.max_length=64",
                             "data.max_prompt_length=32"])
    split, planned, original = _split(), [], StepPlanner.plan

    def recording(self, indices, step):
        planned.append(original(self, indices, step))
        return planned[-1]

    monkeypatch.setattr(StepPlanner, "plan", recording)  # what the dry run planned, step by step
    dims = ParallelDims(world_size=2, global_batch_size=8, micro_batch_size=2)
    first_steps(cfg, dims, split, pad_id=0, steps=3, log=lambda line: None)
    monkeypatch.undo()
    assert len(planned) == 3
    sampler = make_sampler(cfg, split)  # the trainer's sampler draws the same global batches
    for step, plan in enumerate(planned):
        indices = sampler.next_global_batch()
        assert plan.indices == list(indices)
        assert len(plan.micro_batches) == dims.num_micro_batches == 4 and len(plan.kl_rows) == 8
        assert plan.mine(0) != plan.mine(1)
        for rank in range(dims.dp):
            ranked = ParallelDims(world_size=2, global_batch_size=8, micro_batch_size=2, rank=rank)
            targets, kl = _trainer_share(cfg, ranked, split, indices, step)
            assert (targets, kl) == plan.pairs(plan.mine(rank))
