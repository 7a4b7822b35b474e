"""Runs :class:`KTOTrainer` under the launcher and dumps what the end-to-end tests compare:
per-step metrics, eval metrics, the policy's gathered weights after training, and whether the
reference stayed frozen and apart from the policy.

For the crash tests, a run that never reaches the end leaves a trace too: every rank writes its
pid to ``DUMP/pid_rank{r}`` at start, rank 0 appends each step's metrics and rows to
``DUMP/steps.jsonl`` as it goes, and ``--hang-before-step N`` makes every rank write
``DUMP/hanging_rank{r}`` and sleep when step N is about to start (the test then kills one).
``--count-as-skipped 3,5`` reports those steps as skipped to the trainer's counter (their update
is applied all the same), so a resume has a skipped-step count to carry."""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megakto.config import load_config  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.checkpoint import probe_batch  # noqa: E402
from megakto.trainer import KTOTrainer  # noqa: E402


def _engines_alive(collect: bool) -> int:
    """DeepSpeed engines in this process (a precompute's reference must be gone); ``collect``: after
    a garbage collection, else also those only a later collection would free (still resident)."""
    import gc

    from deepspeed.runtime.engine import DeepSpeedEngine

    if collect:
        gc.collect()
    return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())


def _storages(module):
    ptrs = set()
    for p in module.parameters():
        for t in (p, getattr(p, "ds_tensor", None)):
            if t is not None and t.numel() > 0:
                ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


class _TracedTrainer(KTOTrainer):
    """Writes each step to steps.jsonl as soon as it is done; can stop before a given step."""

    def __init__(self, *args, dump: str, hang_before_step: int | None, count_as_skipped=(), **kwargs):
        super().__init__(*args, **kwargs)
        self._dump, self._hang, self._count_as_skipped = dump, hang_before_step, set(count_as_skipped)
        micro_batches = self.step_fn.micro_batches

        def traced(plan):  # this rank's micro-batches of each step, as the step takes them
            mine = micro_batches(plan)
            with open(os.path.join(self._dump, f"micro_rank{comm.rank()}.jsonl"), "a") as f:
                f.write(json.dumps(mine) + "\n")
            return mine

        self.step_fn.micro_batches = traced

    def train_step(self, indices):
        if self._hang is not None and self.step + 1 == self._hang:
            open(os.path.join(self._dump, f"hanging_rank{comm.rank()}"), "w").close()
            time.sleep(3600)
        result = super().train_step(indices)
        if result.step + 1 in self._count_as_skipped:
            result.skipped = "counted as skipped by tests/e2e/run_trainer.py (the update was applied)"
        with open(os.path.join(self._dump, f"metrics_rank{comm.rank()}.jsonl"), "a") as f:
            f.write(json.dumps(result.metrics) + "\n")
        if comm.is_main():
            with open(os.path.join(self._dump, "steps.jsonl"), "a") as f:
                record = {"step": result.step + 1, "metrics": result.metrics, "indices": result.indices}
                f.write(json.dumps(record) + "\n")
        return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--dump", required=True)
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("--hang-before-step", type=int)
    parser.add_argument("--count-as-skipped", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.makedirs(args.dump, exist_ok=True)
    with open(os.path.join(args.dump, f"pid_rank{os.environ.get('RANK', '0')}"), "w") as f:
        f.write(str(os.getpid()))
    cfg = load_config(None, args.overrides)
    engine.configure_cpu_threads()
    trainer = _TracedTrainer(cfg, args.deepspeed, dump=args.dump, hang_before_step=args.hang_before_step,
                           count_as_skipped=[int(s) for s in args.count_as_skipped.split(",") if s])
    engines_at_start = _engines_alive(collect=False)
    ref_engine = getattr(trainer.reference, "engine", None)  # None: cached reference or sft
    tp_group = trainer.dims.tp_group  # None without tensor parallelism
    piped = trainer.dims.pp > 1  # pipelines: the tests read the weights from the final checkpoint
    ref_before = engine.gathered_state_dict(ref_engine.module, tp_group=tp_group) if ref_engine and not piped else {}
    # The reference's log-probs of a few held-out (or training) rows before and after training: a
    # frozen reference gives the same numbers bitwise.
    probe_split = trainer.eval_rows if trainer.eval_rows is not None else trainer.train_rows
    probe = [tuple(map(list, pc)) for pc in zip(*[probe_split.fetch(range(4))[k] for k in ("prompt_ids", "completion_ids")])]
    ref_probe_before = trainer.reference.logps(probe).cpu() if trainer.reference is not None and not piped else None
    history = trainer.train()
    ref_probe_after = trainer.reference.logps(probe).cpu() if trainer.reference is not None and not piped else None
    policy_after, logits = {}, torch.zeros(0)
    if not piped:
        policy_after = engine.gathered_state_dict(trainer.policy.module, tp_group=tp_group)
    if not piped and trainer.dims.sp == 1:  # under Ulysses a plain forward's attention would mix the ranks' rows
        with torch.no_grad():  # the engine's own logits on export's fixed batch (a collective forward)
            logits = trainer.policy(input_ids=probe_batch(trainer.policy.module.config.vocab_size)).logits
        if trainer.dims.tp > 1:  # a vocabulary-parallel head returns this rank's columns
            logits = torch.cat(comm.all_gather_object(logits.float().cpu(), group=tp_group), dim=-1)
    ref_after = engine.gathered_state_dict(ref_engine.module, tp_group=tp_group) if ref_engine and not piped else {}
    shared = len(_storages(trainer.policy.module) & _storages(ref_engine.module)) if ref_engine else 0
    shared = comm.all_reduce_dict({"shared": shared}, group=comm.world_group())["shared"]
    if comm.is_main():
        os.makedirs(args.dump, exist_ok=True)
        torch.save(policy_after, os.path.join(args.dump, "policy.pt"))
        torch.save(ref_after, os.path.join(args.dump, "reference.pt"))
        torch.save(logits.float().cpu(), os.path.join(args.dump, "logits.pt"))
        torch.save({"pairs": probe, "before": ref_probe_before, "after": ref_probe_after},
                   os.path.join(args.dump, "ref_probe.pt"))
        ref_change = max((float((ref_before[k] - ref_after[k]).abs().max()) for k in ref_before), default=None)
        with open(os.path.join(args.dump, "result.json"), "w") as f:
            json.dump({"history": [h.metrics for h in history], "indices": [h.indices for h in history],
                       "eval": trainer.eval_history, "ref_max_change": ref_change,
                       "shared_storages": shared, "world_size": comm.world_size(),
                       "reference_loaded": ref_engine is not None, "engines_alive": [engines_at_start, _engines_alive(collect=True)],
                       "optimizer": type(trainer.policy.optimizer).__name__,
                       "grad_accum_dtype": str(trainer.policy.get_data_types()[1]).removeprefix("torch."),
                       "precompute_seconds": trainer.precompute_seconds,
                       "skipped_steps": trainer.skips.state_dict(),
                       "health": trainer.health.state_dict() if trainer.health else None}, f)


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
