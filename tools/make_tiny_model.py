"""Write a tiny random-init model folder (config, safetensors, local SentencePiece tokenizer, chat
template) for the quickstart and tests: a Llama, or another family with --family. Nothing is
downloaded.

    python tools/make_tiny_model.py runs/tiny-llama [--hidden-size 64 --num-layers 2 --seed 0]
    python tools/make_tiny_model.py runs/tiny-qwen3 --family qwen3
"""

import argparse
import sys
from pathlib import Path

try:
    import megakto  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megakto.errors import MegaktoError
from megakto._demo.tiny_model import FAMILIES, make_tiny_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write (created if missing; files in it are overwritten)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's size")
    parser.add_argument("--max-position-embeddings", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", default="llama", choices=list(FAMILIES),
                        help="architecture (default llama); qwen3_moe has 4 experts, top-2")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_model(
            args.out_dir,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            intermediate_size=args.intermediate_size,
            vocab_size=args.vocab_size,
            seed=args.seed,
            max_position_embeddings=args.max_position_embeddings,
            family=args.family,
        )
    except MegaktoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
