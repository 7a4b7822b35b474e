"""Convert a megakto checkpoint into DeepSpeed's universal format, to resume on another number of
ranks: DeepSpeed's own ``ds_to_universal`` (one fp32 file per parameter: weights and Adam moments)
plus megakto's trainer state (step, sampler position, vocabulary-block layout, parameter shapes)
and manifest. Runs on one CPU process; needs memory for one parameter's states at a time.

    python tools/to_universal.py outputs/run/checkpoints [OUT_DIR] [--tag step-00000100] [--workers 4]

CKPT_DIR is a run's checkpoints/ directory (its newest complete checkpoint unless --tag names one)
or one step-* directory; it is verified as a resume verifies it. OUT_DIR defaults to
universal-<tag> beside the tag. Resume from it with train.resume=OUT_DIR at any number of ranks
(same train.global_batch_size and parallel.tp_size); tools/zero_to_hf.py exports it like any
checkpoint (a LoRA run's frozen base included, taken from the checkpoint's model states). Its
parameters are named for a run with the checkpoint's own kind of layout: pass --pp-size N for a run
with parallel.pp_size=N (a pipeline's layer names, or, for 1, the model's). A conversion killed
midway continues after its last finished stage when run again (the stages are recorded in
.tmp-universal-<tag>/stages.json). A run resumed at another size converts by itself; converting
first keeps a large model's
conversion out of the training job (whose ranks would wait for it within dist.timeout_minutes).
"""

import argparse
import sys
from pathlib import Path

try:
    import megakto  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megakto.errors import MegaktoError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", help="output_dir/checkpoints, or one step-* directory in it")
    parser.add_argument("out_dir", nargs="?", help="folder to write (default: universal-<tag> beside the tag)")
    parser.add_argument("--tag", help="checkpoint to convert inside CKPT_DIR (default: the newest complete one)")
    parser.add_argument("--workers", type=int, default=1, help="DeepSpeed's extraction processes (default 1)")
    parser.add_argument("--pp-size", type=int, help="parallel.pp_size of the run that resumes it (default: the "
                                                    "checkpoint's own)")
    args = parser.parse_args(argv)

    from megakto.checkpoint import read_manifest, resolve_checkpoint, universal

    try:
        tag_dir = resolve_checkpoint(args.ckpt_dir, args.tag)
        pp = args.pp_size or read_manifest(tag_dir).get("pp_size", 1)
        out = universal.convert(tag_dir, args.out_dir or universal.universal_dir(tag_dir), workers=args.workers,
                                layers=universal.layer_names(pp),
                                log=lambda message: print(f"megakto: {message}", file=sys.stderr, flush=True))
        manifest = read_manifest(out)
        print(f"wrote {out} from {tag_dir} ({manifest['world_size']} ranks); resume with train.resume={out} at any "
              f"number of ranks, {'under a pipeline' if pp > 1 else 'without pipeline'}, train.global_batch_size "
              f"and parallel.tp_size={manifest['tp_size']} unchanged")
    except MegaktoError as err:
        parser.exit(2, f"error: {err}\n")  # one line on stderr, exit 2 as tools/zero_to_hf.py
    return 0


if __name__ == "__main__":
    sys.exit(main())
