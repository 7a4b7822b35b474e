"""Under the deepspeed launcher with 2 ranks: a tiny Qwen3-MoE (4 experts, top-2) built so that
routing is decided by the token ids (tokens < 32 go to experts 0 and 1, the others to 2 and 3),
loaded the trainer's way under ZeRO-3 (its MoE block a ZeRO-3 leaf module), each rank given a
micro-batch that routes to experts the other rank never uses. One forward and backward of the
packed log-probs and one SGD step; rank 0 writes OUT/moe.pt with the log-probs of both ranks, the
experts each rank's router picked, the gathered weights after the step, and the same computed
whole in this process (the data-parallel mean of the two ranks' summed log-probs)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402  (SGD instead of the trainer's AdamW: the update is the gradient)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3MoeConfig  # noqa: E402

from megakto.config import load_config  # noqa: E402
from megakto.data.collate import collate  # noqa: E402
from megakto.data.packing import pack  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402
from megakto.distributed.ds_config import build_ds_config  # noqa: E402
from megakto.distributed.parallel import ParallelDims  # noqa: E402
from megakto.model.forward import completion_logps, packed_completion_logps  # noqa: E402

LR = 0.05
VOCAB, HIDDEN = 64, 32


def routed_model(folder: str) -> None:
    """Dimension 0 of every token's embedding is +4 below id 32 and -4 from it, far above the rest
    (init std 0.02), so it dominates the normalized router input in both layers; the routers score
    experts 0 and 1 by +dim0 and experts 2 and 3 by -dim0, so the top-2 follow the token ids."""
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                            tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = torch.where(torch.arange(VOCAB) < VOCAB // 2, 4.0, -4.0)
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight
            gate[:, 0] = torch.tensor([1.0, 0.9, -1.0, -0.9])
    model.save_pretrained(folder)


def rows(rank: int):
    g = torch.Generator().manual_seed(11 + rank)
    low, high = (1, VOCAB // 2) if rank == 0 else (VOCAB // 2, VOCAB)
    return [(torch.randint(low, high, (3 + i,), generator=g).tolist(), torch.randint(low, high, (4 + i,), generator=g).tolist())
            for i in range(3)]


class ExpertsSeen:
    """The experts every router of ``model`` picked, from its outputs (router_indices)."""

    def __init__(self, model):
        self.seen: set[int] = set()
        for module in model.modules():
            if type(module).__name__.endswith("TopKRouter"):
                module.register_forward_hook(lambda _m, _i, out: self.seen.update(out[2].flatten().tolist()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    engine.init_distributed(5)
    folder = os.path.join(args.out, "moe")
    if comm.is_main():
        with engine.outside_zero3():
            routed_model(folder)
    comm.barrier(group=comm.world_group())
    cfg = load_config(None, ["model.path=unused", "data.train_files=unused", "train.global_batch_size=6",
                             "train.micro_batch_size=3", "model.dtype=float32", "optim.grad_clip=1e9"])
    dims = ParallelDims.from_config(cfg, comm.world_size(), rank=comm.rank())
    ds = build_ds_config({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}, cfg, dims, bf16=False)
    model = engine.load_model(folder, ds, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False)
    seen = ExpertsSeen(model)
    policy, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                           config=engine.with_moe_leaves(model, ds))
    leaves = engine.zero3_leaf_classes(policy.module)
    logps, _ = packed_completion_logps(policy, pack(rows(comm.rank()), 64, 0).to("cpu"), attn="sdpa")
    policy.backward(logps.sum())
    policy.step()
    experts = sorted(seen.seen)
    gathered_logps = comm.all_gather_object(logps.detach(), group=comm.world_group())
    gathered_experts = comm.all_gather_object(experts, group=comm.world_group())
    weights = engine.gathered_state_dict(policy.module, tp_group=None)
    if comm.is_main():
        with engine.outside_zero3():
            whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
            want = [completion_logps(whole, collate(rows(r), pad_id=0))[0] for r in range(2)]
            (sum(w.sum() for w in want) / 2).backward()  # DeepSpeed averages gradients over data-parallel ranks
            with torch.no_grad():
                for p in whole.parameters():
                    p -= LR * p.grad
        torch.save({"logps": gathered_logps, "want_logps": [w.detach() for w in want], "experts": gathered_experts,
                    "leaves": leaves, "weights": weights,
                    "want_weights": {k: v.detach().clone() for k, v in whole.named_parameters()}},
                   os.path.join(args.out, "moe.pt"))
    comm.barrier(group=comm.world_group())


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
