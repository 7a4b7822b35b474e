#!/usr/bin/env python
"""How many ZeRO-3 parameters stay gathered through megakto's step: a diagnostic for the planner.

    deepspeed --num_gpus 2 tools/probe_zero3_gathers.py [--prefetch 1000] [--steps 4]

Builds a 4M-parameter random Llama, the policy engine and the frozen reference engine as a run does
(ds_configs/zero3.json, fp32, parameter persistence off), then runs megakto's step order with
packed log-probs: the reference over target + KL rows, the policy over the KL rows (no grad), the
policy's forward, backward and step, two micro-batches each. For each it prints the largest number
of gathered (AVAILABLE) elements seen at any module's forward hook or layer's backward pre-hook,
and the number still gathered after it. Measured on the 2-core AMD EPYC (1 or 2 ranks alike): the
reference holds nearly its whole model during its forward and releases it after; the policy never
holds more than one embedding-sized parameter.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefetch", type=int, default=1000, help="stage3_prefetch_bucket_size (elements)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--work", default=os.path.join(REPO, "outputs", "probe_zero3"))
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    from megakto._demo.tiny_model import make_tiny_model
    from megakto.data.packing import pad_rows
    from megakto.distributed import comm, engine as E
    from megakto.distributed.ds_config import CPU_ZERO_SIZES, reference_ds_config
    from megakto.model.forward import logps_function

    model = os.path.join(args.work, "model")
    E.init_distributed(5)
    if comm.is_main() and not os.path.isfile(os.path.join(model, "config.json")):
        make_tiny_model(model, seed=0, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                        intermediate_size=704, vocab_size=2048, max_position_embeddings=128)
    comm.barrier(group=comm.world_group())
    with open(os.path.join(REPO, "ds_configs", "zero3.json")) as f:
        ds = json.load(f)
    zero = ds["zero_optimization"]
    zero.update({k: v for k, v in CPU_ZERO_SIZES.items() if zero.get(k) == "auto"})  # what the trainer fills on CPU
    world = comm.world_size()
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, train_batch_size=8 * world,
              gradient_clipping=1.0)
    ds["zero_optimization"].update(stage3_prefetch_bucket_size=args.prefetch, stage3_param_persistence_threshold=0)
    ref_ds = reference_ds_config(ds, "none")

    def load(cfg):
        return E.load_model(model, cfg, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False)

    policy = E.build_policy_engine(load(ds), ds, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8,
                                   warmup_steps=0, max_steps=args.steps, schedule="constant", min_lr_ratio=0.0)
    reference = E.build_reference_engine(load(ref_ds), ref_ds)

    def gathered(engine) -> int:
        return E.gathered_numel(engine.module)

    seen = {}
    for name, engine in (("policy", policy), ("reference", reference)):
        def hook(*_, name=name, engine=engine):
            seen[name] = max(seen.get(name, 0), gathered(engine))
        for module in engine.module.modules():
            module.register_forward_hook(hook)
        if name == "policy":
            for layer in engine.module.model.layers:
                layer.register_full_backward_pre_hook(hook)

    logps = logps_function("chunked", attn="sdpa")
    g = torch.Generator().manual_seed(0)

    def rows(n=4):
        return [(torch.randint(0, 2048, (10,), generator=g).tolist(), torch.randint(0, 2048, (20,), generator=g).tolist())
                for _ in range(n)]

    def phase(name, engine, fn):
        seen.clear()
        fn()
        return f"{name} {seen.get('policy' if engine is policy else 'reference', 0)}/{gathered(engine)}"

    rank0 = comm.is_main()
    if rank0:
        print(f"parameters {sum(p.ds_numel for p in policy.module.parameters())}; per phase: most gathered/after")
    for step in range(args.steps):
        out = []
        with torch.no_grad():
            out += [phase("reference", reference, lambda: logps(reference, pad_rows(rows(8), 0))) for _ in range(2)]
            out += [phase("policy-KL", policy, lambda: logps(policy, pad_rows(rows(), 0))) for _ in range(2)]

        def train():
            lp, _ = logps(policy, pad_rows(rows(), 0))
            policy.backward(lp.sum())
            policy.step()
        out += [phase("policy-train", policy, train) for _ in range(2)]
        if rank0:
            print(f"step {step}: " + ", ".join(out), flush=True)
    return 0


if __name__ == "__main__":
    from megakto.distributed import comm

    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
