#!/usr/bin/env python
"""Train a causal LM with KTO on DeepSpeed.

    deepspeed --num_gpus 2 launch/train_kto.py --config configs/tiny_demo.yaml \
        --deepspeed ds_configs/zero3.json [key=value ...]

Dotted ``key=value`` overrides follow the YAML recipe (``--help-config`` lists every key).

    python launch/train_kto.py --dry-run --world-size 32 --config ... --deepspeed ... [--no-data]

``--dry-run`` runs every start-up check that needs neither weights nor other ranks, in this one
process, at the given world size, prints the memory plan and exits 0, or 1 with the first error.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# How long a rank that stays silent about a shared error waits for rank 0 to print it (see main).
_SILENT_RANK_GRACE_S = 30.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="recipe in configs/ (optional: overrides alone work)")
    parser.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed settings; batch fields are filled in")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher passes it
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--dry-run", action="store_true", help="check the start-up, print the memory plan, exit")
    parser.add_argument("--world-size", type=int, default=None, help="--dry-run: ranks of the run (default: $WORLD_SIZE or 1)")
    parser.add_argument("--no-data", action="store_true", help="--dry-run: skip the tokenizer and data")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB", help="--dry-run: memory per GPU, for the verdict")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="--dry-run: ranks per node (host memory per node)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="--dry-run: plan a GPU or a CPU-only run")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from megakto.config import config_help, load_config
    from megakto.errors import MegaktoError

    if args.help_config:
        print(config_help())
        return 0
    comm = None
    try:
        try:
            cfg = load_config(args.config, args.overrides)
            if not args.deepspeed:
                raise MegaktoError("--deepspeed PATH is required (e.g. ds_configs/zero3.json)")
        except MegaktoError as err:
            err.shared = True  # every rank parsed the same command line: rank 0 speaks for all
            raise
        if args.dry_run:
            from megakto.dry_run import dry_run

            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            dry_run(cfg, args.deepspeed, world, load_data=not args.no_data, on_gpu=args.device == "gpu",
                    gpu_memory=args.gpu_memory, gpus_per_node=args.gpus_per_node, overrides=tuple(args.overrides),
                    config_path=args.config)
            print("dry run: ok", flush=True)
            return 0
        from megakto.distributed import comm
        from megakto.distributed.engine import configure_cpu_threads
        from megakto.startup import offloads_to_host
        from megakto.trainer import KTOTrainer

        configure_cpu_threads(offloaded=offloads_to_host(cfg, args.deepspeed))
        KTOTrainer(cfg, args.deepspeed).train()
    except MegaktoError as err:
        rank = int(os.environ.get("RANK", "0"))
        shared = getattr(err, "shared", False)
        if not shared and comm is not None:  # this rank's alone: one line, then leave at once
            comm.report_failure(err)
            comm.abort(1)
        if rank == 0 or not shared:  # a shared error is printed once, by rank 0
            print(f"megakto: error: {'' if rank == 0 else f'rank {rank}: '}{err}", file=sys.stderr, flush=True)
        elif comm is None:
            # Before any process group the ranks cannot wait for each other, and the launcher kills
            # every rank as soon as one exits non-zero: a rank that left first could kill rank 0
            # before it printed the one line. Give rank 0 the time to speak; the launcher ends this
            # rank as soon as rank 0 has exited.
            time.sleep(_SILENT_RANK_GRACE_S)
        return 1
    except BaseException as err:
        # A failure this rank may have hit alone (an OOM, a bug, a peer gone): its report, then leave
        # without tearing the process group down, which under NCCL waits for peers that may sit in a
        # collective until dist.timeout_minutes; the launcher ends them when this rank exits.
        if comm is None:
            raise
        comm.report_failure(err)
        comm.abort(1)
    finally:
        # The exits every rank takes together (0, or a shared error): a rank exiting with its process
        # group alive can abort at interpreter exit ("terminate called without an active exception"),
        # turning exit status 1 into 250.
        if comm is not None:
            comm.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


if __name__ == "__main__":
    status = main()
    # Leave without the interpreter's teardown: a C++ thread still alive in a library's static state
    # (gloo, a tokenizer or datasets pool) can abort there ("terminate called without an active
    # exception"), turning exit status 1 into 250. Everything megakto writes is closed and flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
