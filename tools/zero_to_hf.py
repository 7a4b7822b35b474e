"""Convert a megakto checkpoint into a Hugging Face folder: safetensors, the run's config.json,
generation config, tokenizer and chat template. Every layout megakto writes: ZeRO 1-3, tensor-parallel
shards (joined), pipeline per-layer files (renamed). Runs on one CPU process; needs memory for one
full fp32 copy of the model.

    python tools/zero_to_hf.py outputs/run/checkpoints outputs/run/hf [--tag step-00000100] [--check]

CKPT_DIR is a run's checkpoints/ directory (its newest complete checkpoint is used unless --tag
names one) or one step-* directory. --check reloads the folder with from_pretrained and compares
its logits with those of the checkpointed weights on a fixed batch; exit 1 if they differ by more
than 1e-5.
"""

import argparse
import sys
from pathlib import Path

try:
    import megakto  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megakto.errors import MegaktoError

TOLERANCE = 1e-5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", help="output_dir/checkpoints, or one step-* directory in it")
    parser.add_argument("out_dir", help="folder to write (created if missing; files in it are overwritten)")
    parser.add_argument("--tag", help="checkpoint to convert inside CKPT_DIR (default: the newest complete one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: the dtype the run trained in")
    parser.add_argument("--check", action="store_true", help=f"compare logits; exit 1 above {TOLERANCE:g}")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model config to run code from its folder (off by default)")
    args = parser.parse_args(argv)

    from megakto.export import check_export, export_checkpoint, resolve_checkpoint

    try:
        tag_dir = resolve_checkpoint(args.ckpt_dir, args.tag)
        export_checkpoint(tag_dir, args.out_dir, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        print(f"wrote {args.out_dir} from {tag_dir}")
        if args.check:
            diff = check_export(args.out_dir, tag_dir, trust_remote_code=args.trust_remote_code)
            ok = diff <= TOLERANCE
            print(f"check: max abs logit diff {diff:.3g} ({'ok' if ok else 'FAILED'}, tolerance {TOLERANCE:g})")
            return 0 if ok else 1
    except MegaktoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
