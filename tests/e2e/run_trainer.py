"""Runs :class:`KTOTrainer` under the launcher and dumps what the end-to-end tests compare:
per-step metrics, eval metrics, the policy's gathered weights after training, and whether the
reference stayed frozen and apart from the policy."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megakto.config import load_config  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.trainer import KTOTrainer  # noqa: E402


def _storages(module):
    ptrs = set()
    for p in module.parameters():
        for t in (p, getattr(p, "ds_tensor", None)):
            if t is not None and t.numel() > 0:
                ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--dump", required=True)
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    engine.configure_cpu_threads()
    trainer = KTOTrainer(cfg, args.deepspeed)
    ref_before = engine.gathered_state_dict(trainer.reference.module)
    history = trainer.train()
    policy_after = engine.gathered_state_dict(trainer.policy.module)
    ref_after = engine.gathered_state_dict(trainer.reference.module)
    shared = len(_storages(trainer.policy.module) & _storages(trainer.reference.module))
    shared = comm.all_reduce_dict({"shared": shared})["shared"]
    if comm.is_main():
        os.makedirs(args.dump, exist_ok=True)
        torch.save(policy_after, os.path.join(args.dump, "policy.pt"))
        torch.save(ref_after, os.path.join(args.dump, "reference.pt"))
        ref_change = max(float((ref_before[k] - ref_after[k]).abs().max()) for k in ref_before)
        with open(os.path.join(args.dump, "result.json"), "w") as f:
            json.dump({"history": [h.metrics for h in history], "indices": [h.indices for h in history],
                       "eval": trainer.eval_history, "ref_max_change": ref_change,
                       "shared_storages": shared, "world_size": comm.world_size()}, f)


if __name__ == "__main__":
    main()
