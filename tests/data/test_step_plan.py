"""The dry run plans what the trainer runs: both take one global batch through
:meth:`megakto.data.step_plan.StepPlanner.plan` from :func:`megakto.startup.step_planner`. Each
path is run on the same 24 rows (the trainer's ``train_step`` on a stand-in ``self``, stopped once
it has its rank's micro-batches) and the micro-batches of every data-parallel rank compared."""

from types import SimpleNamespace

import pytest
from datasets import Dataset

from megakto.config import load_config
from megakto.data.split import TokenizedSplit
from megakto.data.step_plan import StepPlanner
from megakto.distributed.parallel import ParallelDims
from megakto.dry_run import first_steps
from megakto.startup import make_sampler, step_planner
from megakto.trainer import KTOTrainer

ROWS = 24


def _split() -> TokenizedSplit:
    """Rows of varied lengths, 6 prompts, both classes."""
    prompts = [[1 + i % 6] * (2 + i % 5) for i in range(ROWS)]
    completions = [[20 + i] * (1 + (7 * i) % 9) for i in range(ROWS)]
    labels = [i % 3 != 0 for i in range(ROWS)]
    ds = Dataset.from_dict({"prompt_ids": prompts, "completion_ids": completions, "label": labels,
                            "prompt_key": [i % 6 for i in range(ROWS)]})
    return TokenizedSplit(ds)


class _Planned(Exception):
    pass


def _trainer_share(cfg, dims, split, indices, step):
    """What ``KTOTrainer.train_step`` takes as data-parallel rank ``dims.dp_rank``'s micro-batches,
    and the KL rows it pairs with them."""
    seen = {}

    def mine(plan):
        seen["mine"], seen["kl"] = KTOTrainer._my_micro_batches(me, plan), plan.kl_rows
        raise _Planned()

    me = SimpleNamespace(cfg=cfg, dims=dims, step=step, use_kl=cfg.kto.loss_type == "kto",
                         planner=step_planner(cfg, dims, split), _my_micro_batches=mine)
    with pytest.raises(_Planned):
        KTOTrainer.train_step(me, indices)
    return seen["mine"], seen["kl"]


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
            mine, kl = _trainer_share(cfg, ranked, split, indices, step)
            assert mine == plan.mine(rank)
            assert kl == plan.kl_rows
