"""Write the demo sorting task as train.jsonl and eval.jsonl (disjoint prompts; every prompt in
eval has one desirable and one undesirable completion, for per-prompt reward accuracy).

    python tools/make_demo_data.py runs/demo-data [--n-train 2000 --n-eval 200 --seed 0]
"""

import argparse
import sys
from pathlib import Path

try:
    import megakto  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megakto._demo.data import write_demo_data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--n-train", type=int, default=2000, help="training prompts")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--unpaired",
        action="store_true",
        help="one training row per prompt with a random label, instead of one of each",
    )
    args = parser.parse_args(argv)
    if args.n_train < 1 or args.n_eval < 0:
        parser.error("--n-train must be >= 1 and --n-eval >= 0")
    train_path, eval_path = write_demo_data(
        args.out_dir,
        n_train_prompts=args.n_train,
        n_eval_prompts=args.n_eval,
        seed=args.seed,
        both_labels=not args.unpaired,
    )
    print(f"wrote {train_path} and {eval_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
