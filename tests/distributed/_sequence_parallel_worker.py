"""Under the deepspeed launcher with 2 ranks (SP2) or 4 (SP2 × DP2): for each architecture a tiny
random model is saved and loaded the trainer's way (engine.load_model under ZeRO-3 with
sequence_parallel_size, packed_sdpa attention, Ulysses registered, the engine given DeepSpeed's
mpu), and each data-parallel rank's rows (3 of the 6 at DP2, all 6 at DP1) are scored through the
sequence-parallel log-prob function. Dumped per architecture, beside the same model run whole in
this process:

* ``logps``: the per-row log-probs in train mode, with grad;
* ``weights``: the gathered weights after one SGD step on a non-linear per-row loss of them
  (ZeRO-3's default reduce-scatter; the gradient scale of megakto.distributed.sequence);
* ``weights_nrs``: the same from a second engine with ``reduce_scatter: false`` (the 1/sp scale);
* ``eval_packed``/``eval_rows``: after the step, in eval mode without grad, packed and one row per
  sequence (the reference's path: the attention stays sequence-sharded in eval mode).

Rank r writes OUT/<arch>_rank<r>.pt (every rank: the ranks of a sequence group must agree)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402  (SGD instead of the trainer's AdamW: the update is the gradient)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from megakto.config import load_config  # noqa: E402
from megakto.data.packing import pack, pad_rows  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.distributed.ds_config import build_ds_config  # noqa: E402
from megakto.distributed.parallel import ParallelDims  # noqa: E402
from megakto.distributed.sequence import grad_scale, sequence_sum  # noqa: E402
from megakto.model.sp_attention import register_packed_sdpa  # noqa: E402
from megakto.model.sp_forward import sp_logps_function  # noqa: E402
from tests.distributed._sequence_cases import ARCHS, LR, loss_of, rows  # noqa: E402


def _saved(folder, make):
    """Rank 0 writes a random model of config ``make()`` (seed 0) to ``folder``; every rank waits for it."""
    if comm.is_main():
        torch.manual_seed(0)
        with engine.outside_zero3():
            AutoModelForCausalLM.from_config(make()).save_pretrained(folder)
    comm.barrier(group=comm.world_group())
    return folder


def _engine(folder, ds, mpu):
    model = engine.load_model(folder, ds, dtype=torch.float32, attn_implementation="packed_sdpa",
                              trust_remote_code=False)
    mpu = mpu or engine.register_ulysses(model, 2, "packed_sdpa")
    policy, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                           config=ds, mpu=mpu)
    return policy, mpu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    engine.init_distributed(5)
    register_packed_sdpa()
    world = comm.world_size()
    cfg = load_config(None, ["model.path=unused", "data.train_files=unused", f"train.global_batch_size={world}",
                             "train.micro_batch_size=2", "parallel.sp_size=2", "model.dtype=float32",
                             "optim.grad_clip=1e9", "data.max_length=64"])
    dims = ParallelDims.from_config(cfg, world, rank=comm.rank())
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    ds = build_ds_config({"zero_optimization": zero, "zero_allow_untested_optimizer": True,
                          "steps_per_print": 10**9}, cfg, dims, bf16=False)
    ds_nrs = {**ds, "zero_optimization": {**zero, "reduce_scatter": False}}
    mine = rows()[dims.dp_rank * 6 // dims.dp:(dims.dp_rank + 1) * 6 // dims.dp]
    mpu = None
    for name, make in ARCHS.items():
        folder = _saved(os.path.join(args.out, name), make)
        result = {}
        for key, config in (("weights", ds), ("weights_nrs", ds_nrs)):
            policy, mpu = _engine(folder, config, mpu)
            dp_group, sp_group = engine.sequence_groups(mpu, 2)
            assert comm.group_ranks(group=dp_group) == dims.dp_group_ranks()
            assert comm.group_ranks(group=sp_group) == dims.sp_group_ranks()
            logps_fn = sp_logps_function(sp_size=2, sp_rank=dims.sp_rank,
                                         combine=sequence_sum(group=sp_group, scale=grad_scale(config, 2)))
            policy.train()
            logps, n_tokens = logps_fn(policy, pack(mine, 64, 0))
            policy.backward(loss_of(logps, dims.dp_rank * len(mine)))
            policy.step()
            result[key] = engine.gathered_state_dict(policy.module, tp_group=None)
            if key == "weights":
                result["logps"], result["n_tokens"] = logps.detach(), n_tokens
                policy.eval()
                with torch.no_grad():
                    result["eval_packed"] = logps_fn(policy, pack(mine, 64, 0))[0]
                    result["eval_rows"] = logps_fn(policy, pad_rows(mine, 0))[0]
            del policy
        torch.save(result, os.path.join(args.out, f"{name}_rank{comm.rank()}.pt"))
        comm.barrier(group=comm.world_group())


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
