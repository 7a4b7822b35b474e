#!/usr/bin/env python
"""What the frozen reference engine holds during a forward: a diagnostic for the planner's
``zero3_forward_gathers`` (megakto/planning/states.py).

    MALLOC_MMAP_THRESHOLD_=1048576 deepspeed --num_gpus 2 tools/probe_reference_gathers.py \
        [--prefetch N] [--max-live N] [--hidden 1024 --layers 4 --vocab 8192] [--forwards 3]

Builds a random Llama (fp32) and the reference engine as a run builds it
(``reference_ds_config``; ``--prefetch``/``--max-live`` set its ``stage3_prefetch_bucket_size`` and
``stage3_max_live_parameters``, DeepSpeed's defaults otherwise), runs ``--forwards`` forwards of 8
rows and prints, per forward, the most elements held at any module's forward hook: the parameters
gathered (AVAILABLE) plus the flat all-gather buffers still alive (one per
``AllGatherCoalescedHandle``), and the most glibc's mmapped bytes grew (with the threshold above,
every block over 1 MiB, from any thread) in fp32 elements. The first forward records DeepSpeed's
trace and prefetches nothing; the later ones are the run's. Measured on the 2-core AMD EPYC: at the
defaults the whole model's buffers are in flight before the first weight is used, and waiting on it
gives the first bucket's parameters their own copies (docs/planning.md).
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefetch", type=int, default=None, help="stage3_prefetch_bucket_size (elements)")
    parser.add_argument("--max-live", type=int, default=None, help="stage3_max_live_parameters (elements)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(REPO, "outputs", "probe_reference"))
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch
    from megakto._demo.tiny_model import make_tiny_model
    from megakto.data.packing import pad_rows
    from megakto.distributed import comm, engine as E
    from megakto.distributed.ds_config import reference_ds_config
    from megakto.model.forward import logps_function
    from megakto.peak_memory import heap_figures

    model = os.path.join(args.work, f"model-h{args.hidden}-l{args.layers}-v{args.vocab}")
    E.init_distributed(5)
    if comm.is_main() and not os.path.isfile(os.path.join(model, "config.json")):
        make_tiny_model(model, seed=0, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 128,
                        num_kv_heads=max(1, args.hidden // 256), intermediate_size=int(2.75 * args.hidden),
                        vocab_size=args.vocab, max_position_embeddings=512)
    comm.barrier(group=comm.world_group())
    world = comm.world_size()
    ref_ds = reference_ds_config({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                  "train_batch_size": 4 * world}, "none")
    for key, value in (("stage3_prefetch_bucket_size", args.prefetch), ("stage3_max_live_parameters", args.max_live)):
        if value is not None:
            ref_ds["zero_optimization"][key] = value

    alive = E.track_gather_buffers()
    ref = E.build_reference_engine(E.load_model(model, ref_ds, dtype=torch.float32, attn_implementation="sdpa",
                                                trust_remote_code=False), ref_ds)

    def buffers() -> list[int]:
        return [n // 4 for n in alive()]  # fp32 elements

    most = {"held": (0, 0, []), "mmapped": 0, "base": 0}

    def hook(*_):
        gathered, bufs = E.gathered_numel(ref.module), buffers()
        if gathered + sum(bufs) > most["held"][0]:
            most["held"] = (gathered + sum(bufs), gathered, bufs)
        most["mmapped"] = max(most["mmapped"], heap_figures()["mmapped"] - most["base"])
    for module in ref.module.modules():
        module.register_forward_pre_hook(hook)
        module.register_forward_hook(hook)

    logps = logps_function("chunked", attn="sdpa")
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(0, args.vocab, (30,), generator=g).tolist(),
             torch.randint(0, args.vocab, (60,), generator=g).tolist()) for _ in range(8)]
    params = sum(p.ds_numel for p in ref.module.parameters())
    for i in range(args.forwards):
        most.update(held=(0, 0, []), mmapped=0, base=heap_figures()["mmapped"])
        with torch.no_grad():
            logps(ref, pad_rows(rows, 0))
        held, gathered, bufs = most["held"]
        if comm.is_main():
            print(f"forward {i}: P {params / 1e6:.2f}M; most held {held / 1e6:.2f}M = gathered {gathered / 1e6:.2f}M + "
                  f"buffers {[round(b / 1e6, 2) for b in bufs]}M; mmapped grew {most['mmapped'] / 4e6:.2f}M fp32 elements; "
                  f"after: gathered {E.gathered_numel(ref.module) / 1e6:.2f}M, {len(buffers())} buffers", flush=True)
    return 0


if __name__ == "__main__":
    from megakto.distributed import comm

    comm.run_rank(main)  # ends the rank without the interpreter's teardown (comm.exit_process)
