#!/usr/bin/env python
"""Predict a KTO run's memory per rank and per node from the model's config.json alone (no weights).

    python tools/plan_memory.py --config configs/qwen2.5-32b/one_node_offload.yaml \
        --deepspeed configs/qwen2.5-32b/one_node_offload.json --world-size 8 --gpu-memory 80 [key=value ...]

Takes the launcher's --config, --deepspeed and dotted overrides; prints a table (component x bytes
per rank, host bytes per node), whether it fits in --gpu-memory, and the smallest changes that make
it fit. --json prints one object instead (peak_bytes_per_rank, host_bytes_per_node, ...).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="the run's recipe")
    parser.add_argument("--deepspeed", metavar="JSON", required=True, help="the run's DeepSpeed settings")
    parser.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) of the run")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory per GPU; the verdict needs it")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node, for host memory per node")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: a CPU-only run (fp32 under model.dtype=auto; device and host are one memory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from megakto.errors import MegaktoError
    from megakto.planning.report import plan_json
    from megakto.planning.run_plan import PlanRequest, plan_report

    req = PlanRequest(args.config, args.deepspeed, tuple(args.overrides), args.world_size, on_gpu=args.device == "gpu",
                      gpu_memory=args.gpu_memory, gpus_per_node=args.gpus_per_node)
    try:
        plan, text, changes = plan_report(req)
    except MegaktoError as err:
        print(f"megakto: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        out = plan_json(plan)
        out["fitting_changes"] = [{"change": name, "peak_bytes_per_rank": q.peak_bytes_per_rank,
                                   "host_bytes_per_node": q.host_bytes_per_node} for name, q in changes]
        print(json.dumps(out, indent=1))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
