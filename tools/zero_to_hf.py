"""Convert a megakto checkpoint into a Hugging Face folder: safetensors, the run's config.json,
generation config, tokenizer and chat template. Every layout megakto writes: ZeRO 1-3, tensor-parallel
shards (joined), pipeline per-layer files (renamed). Runs on one CPU process; needs memory for one
full fp32 copy of the model.

    python tools/zero_to_hf.py outputs/run/checkpoints outputs/run/hf [--tag step-00000100] [--check]
    python tools/zero_to_hf.py outputs/run/checkpoints outputs/run/adapter     # a LoRA run: the adapter
    python tools/zero_to_hf.py outputs/run/checkpoints outputs/run/hf --merge-lora [--check]

CKPT_DIR is a run's checkpoints/ directory (its newest complete checkpoint is used unless --tag
names one) or one step-* directory. --check reloads the folder with from_pretrained and compares
its logits with those of the checkpointed weights on a fixed batch; exit 1 if they differ by more
than 1e-5.

A LoRA checkpoint (model.lora.r > 0) converts to the adapter alone in peft's format
(adapter_config.json, adapter_model.safetensors; load it with PeftModel.from_pretrained on the
base model), or with --merge-lora to the merged model W + (alpha / r) B A as a plain Hugging Face
folder, which --check compares with the checkpointed adapters.
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
    parser.add_argument("--merge-lora", action="store_true",
                        help="a LoRA checkpoint: write the merged model instead of the adapter alone")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model config to run code from its folder (off by default)")
    args = parser.parse_args(argv)

    from megakto.errors import ConfigError
    from megakto.checkpoint import check_export, export_checkpoint, is_lora_checkpoint, resolve_checkpoint

    try:
        tag_dir = resolve_checkpoint(args.ckpt_dir, args.tag)
        lora = is_lora_checkpoint(tag_dir)
        if args.merge_lora and not lora:
            raise ConfigError(f"--merge-lora: {tag_dir} is not a LoRA checkpoint; leave the flag out")
        if lora and not args.merge_lora:
            if args.check:
                raise ConfigError("--check compares a Hugging Face folder's logits: with a LoRA checkpoint, add "
                                  "--merge-lora")
            export_checkpoint(tag_dir, None, adapter_dir=args.out_dir, dtype=args.dtype,
                              trust_remote_code=args.trust_remote_code)
            print(f"wrote the LoRA adapter {args.out_dir} from {tag_dir} (--merge-lora for the merged model)")
            return 0
        export_checkpoint(tag_dir, args.out_dir, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        print(f"wrote {args.out_dir} from {tag_dir}" + (" (LoRA merged)" if lora else ""))
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
