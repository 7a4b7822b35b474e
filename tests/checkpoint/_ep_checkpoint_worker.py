"""Under the deepspeed launcher with 2 ranks: a tiny Qwen3-MoE (4 experts, top-2) in a DeepSpeed
AutoEP engine (autoep_size 2, ZeRO --stage, torch AdamW), built directly, without a runner.

Four AdamW steps on fixed batches (rank r's batch of step s is seeded by (s, r)), saved through
megakto's own checkpoint.save after step 2; rank 0 converts that save to its universal form
(megakto.checkpoint.universal.convert, DeepSpeed's ds_to_universal inside). Then, each from the
saved step 2, engines resume steps 3 and 4:

* ``universal``: an AutoEP engine (autoep_size 2) loading the universal form through megakto's
  engine.load_checkpoint (the ZeRO-3 step counter cloned per sub-group there);
* ``dense``: with --dense, a plain ZeRO engine (no expert parallelism, Hugging Face names) loading
  the universal form renamed to Hugging Face names (--dense-dir, written by the test).

Rank 0 writes OUT/result.pt: the losses of each run, the logits of the engine at step 2 on
megakto.checkpoint.probe_batch, and whether the Adam step tensors are shared after the load."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3MoeConfig  # noqa: E402

from megakto import checkpoint  # noqa: E402
from megakto.checkpoint import universal  # noqa: E402
from megakto.checkpoint.resume import held_shapes  # noqa: E402
from megakto.distributed import comm, engine  # noqa: E402

VOCAB = 64
STEPS, SAVE_AT = 4, 2


def tiny_moe(folder: str) -> None:
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                            tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


def build(folder: str, stage: int, ep: int, *, load_universal: bool):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
              "steps_per_print": 10 ** 6}
    if ep > 1:
        config["expert_parallel"] = {"enabled": True, "autoep_size": ep, "preset_model": "qwen3_moe"}
    if load_universal:
        config = engine.universal_load_config(config)
    policy, *_ = deepspeed.initialize(model=model, config=config, model_parameters=list(model.parameters()))
    return policy


def train(policy, steps) -> list[float]:
    losses = []
    for step in steps:
        ids = batch(step, comm.rank())
        loss = policy(input_ids=ids, labels=ids).loss
        policy.backward(loss)
        policy.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(policy) -> torch.Tensor:
    policy.eval()
    out = policy(input_ids=checkpoint.probe_batch(VOCAB)).logits.float()
    policy.train()
    return out


def shared_steps(policy) -> bool:
    states = [s for s in getattr(policy.optimizer, "optimizer", policy.optimizer).state.values() if "step" in s]
    return len({id(s["step"]) for s in states}) < len(states)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--dense-dir", help="the universal form under Hugging Face names: resume it without EP")
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    engine.init_distributed(5)
    engine.allow_string_registry_keys()  # the expert-parallel mode's transformers 5.25 shim
    folder, ckpt = os.path.join(args.out, "moe"), os.path.join(args.out, "checkpoints")
    result = {}
    if not args.dense_dir:
        if comm.is_main():
            tiny_moe(folder)
        comm.barrier(group=comm.world_group())
        policy = build(folder, args.stage, 2, load_universal=False)
        result["losses"] = train(policy, range(SAVE_AT))
        state = {"step": SAVE_AT, "sampler": {}, "rng": {}, "eval_history": [], "param_shapes": held_shapes(policy.module)}
        tag = checkpoint.save(policy, ckpt, SAVE_AT, state, keep_last=3, dtype="float32", ep_size=2)
        result["logits"] = logits(policy)
        result["losses"] += train(policy, range(SAVE_AT, STEPS))
        if comm.is_main():
            universal.convert(tag, universal.universal_dir(tag))
        comm.barrier(group=comm.world_group())
        resumed = build(folder, args.stage, 2, load_universal=True)
        engine.load_checkpoint(resumed, ckpt, "universal-" + os.path.basename(tag))
        result["universal_shared_steps"] = shared_steps(resumed)
        result["universal"] = train(resumed, range(SAVE_AT, STEPS))
    else:
        dense = build(folder, args.stage, 1, load_universal=True)
        engine.load_checkpoint(dense, os.path.dirname(args.dense_dir), os.path.basename(args.dense_dir))
        result["dense"] = train(dense, range(SAVE_AT, STEPS))
    if comm.is_main():
        torch.save(result, os.path.join(args.out, "dense.pt" if args.dense_dir else "result.pt"))
        print(json.dumps({k: v for k, v in result.items() if k != "logits"}), flush=True)


if __name__ == "__main__":
    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
