"""Under the deepspeed launcher with 2 ranks: for each architecture (Llama, Mistral, Qwen2, Qwen3,
and Qwen2 with tied embeddings) a tiny random model is saved, loaded the trainer's way
(engine.load_model under ZeRO-3) into an AutoTP-2 policy engine, and given one packed batch:
the vocabulary-parallel log-probs and, after one SGD step on their sum, the gathered weights and
the log-probs again are dumped next to those of the same model run whole in this process (full
logits, plain torch).
Rank 0 writes OUT/<arch>.pt."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402  (SGD instead of the trainer's AdamW: the update is the gradient)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from megakto.config import load_config  # noqa: E402
from megakto.data.packing import pack  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.distributed.ds_config import build_ds_config  # noqa: E402
from megakto.distributed.parallel import ParallelDims  # noqa: E402
from megakto.distributed.vocab_parallel import group_reducers  # noqa: E402
from megakto.model.forward import packed_completion_logps  # noqa: E402
from megakto.model.tp_checks import check_tp_config, check_vocab_parallel_head  # noqa: E402
from tests.model._arch_cases import ARCHS, LR, rows, whole  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    engine.init_distributed(5)
    cfg = load_config(None, ["model.path=unused", "data.train_files=unused", "train.global_batch_size=2",
                             "train.micro_batch_size=2", "parallel.tp_size=2", "model.dtype=float32", "optim.grad_clip=1e9"])
    dims = ParallelDims.from_config(cfg, comm.world_size(), rank=comm.rank())
    ds = build_ds_config({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}, cfg, dims, bf16=False)
    for name, make in ARCHS.items():
        folder = os.path.join(args.out, name)
        if comm.is_main():
            torch.manual_seed(0)
            with engine.outside_zero3():
                AutoModelForCausalLM.from_config(make()).save_pretrained(folder)
        comm.barrier(group=comm.world_group())
        check_tp_config(make(), 2)
        model = engine.load_model(folder, ds, dtype=torch.float32, attn_implementation="eager",
                                  trust_remote_code=False)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        policy, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        _, tp_group = engine.parallel_groups(2)
        check_vocab_parallel_head(policy, 2)
        reducers = group_reducers(tp_group)
        logps, _ = packed_completion_logps(policy, pack(rows(), 64, 0).to("cpu"), attn="eager", reducers=reducers)
        policy.backward(logps.sum())
        policy.step()
        with torch.no_grad():  # after the step: a tied head must have moved with the embedding
            after, _ = packed_completion_logps(policy, pack(rows(), 64, 0).to("cpu"), attn="eager", reducers=reducers)
        weights = engine.gathered_state_dict(policy.module, tp_group=tp_group)
        with engine.outside_zero3():
            want_logps, want_after, want_weights = whole(folder)
        if comm.is_main():
            torch.save({"logps": logps.detach(), "want_logps": want_logps, "after": after, "want_after": want_after,
                        "weights": weights, "want_weights": want_weights}, os.path.join(args.out, f"{name}.pt"))
        comm.barrier(group=comm.world_group())
        del policy, model, opt


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
