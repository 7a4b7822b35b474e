"""Under the launcher: the trainer with one micro-batch's policy log-probs made NaN (step 2's
second micro-batch, after the first one's backward; under a pipeline, inside its train_batch).
Rank 0 writes, per step, whether it was skipped, whether its weights changed (a pipeline's first
stage: its own layers), and DeepSpeed's skipped-step count to OUT.json.

    worker.py OUT.json DS_JSON key=value ...
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megakto.config import load_config  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.trainer import KTOTrainer  # noqa: E402

POISONED_CALL = 4  # loss calls: step 1 -> 1, 2; step 2 -> 3, 4 (grad-accum 2)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, ds, overrides = args[0], args[1], args[2:]
    trainer = KTOTrainer(load_config(None, overrides), ds)
    # The policy pass hands each micro-batch's log-probs to the trainer's loss (under a pipeline,
    # inside train_batch on its last stage): the POISONED_CALL-th becomes NaN.
    train, calls = trainer.runner.train, [0]

    def poisoned_train(batches, loss_fn, **kwargs):
        def loss(i, logps):
            calls[0] += 1
            return loss_fn(i, logps * float("nan") if calls[0] == POISONED_CALL else logps)
        return train(batches, loss, **kwargs)

    trainer.runner.train = poisoned_train
    train_step, steps = trainer.train_step, []

    def traced(indices):
        before = engine.gathered_state_dict(trainer.policy.module, tp_group=trainer.dims.tp_group)
        result = train_step(indices)
        after = engine.gathered_state_dict(trainer.policy.module, tp_group=trainer.dims.tp_group)
        steps.append({"skipped": result.skipped, "changed": any(not torch.equal(before[k], after[k]) for k in before),
                      "ds_skipped": trainer.policy.skipped_steps, "loss": result.metrics["loss"]})
        return result

    trainer.train_step = traced
    trainer.train()
    if comm.is_main():
        with open(out, "w") as f:
            json.dump(steps, f)


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
