#!/usr/bin/env python
"""Pictures of finished (or running) megakto runs, from their TensorBoard events.

    python tools/plot_run.py OUTPUT_DIR [OUTPUT_DIR ...] [--out DIR]

Writes PNGs: loss.png, kl.png (the KL estimate, clamped and raw), rewards.png (desirable and
undesirable completions, and z_ref in the same units), slopes.png (how saturated eq. 7's sigmoids
are, per class), margin.png and eval_reward_accuracy.png (held-out reward accuracy), into OUTPUT_DIR/plots (the first run's)
unless --out names another folder. Several runs go on the same axes, labelled by their folder
names, to compare them. A panel whose metric no run logged (e.g. rewards of an SFT run) is skipped
and said so.
"""

from __future__ import annotations

import argparse
import os
import sys

# (file name, title, [(tag, label suffix)]): what a KTO run is judged by.
PANELS = [
    ("loss.png", "training loss", [("loss", "")]),
    ("kl.png", "KL estimate over mismatched pairs: clamped at 0 (used) and raw",
     [("kl", ""), ("kl/raw", " raw")]),
    ("rewards.png", "implied rewards beta * log(pi / pi_ref) and the reference point z_ref",
     [("rewards/chosen", " desirable"), ("rewards/rejected", " undesirable"), ("kl/z_ref", " z_ref")]),
    ("slopes.png", "sigmoid slope 4 s(z) s(-z): 1 = steepest, 0 = saturated (no gradient)",
     [("kto/slope/chosen", " desirable"), ("kto/slope/rejected", " undesirable")]),
    ("margin.png", "reward margin (desirable - undesirable)", [("rewards/margins", "")]),
    ("eval_reward_accuracy.png", "held-out reward accuracy", [("eval/reward_accuracy", "")]),
]


class PlotError(Exception):
    pass


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's ``tensorboard`` folder: tag -> [(step, value)], by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = os.path.join(run_dir, "tensorboard")
    if not os.path.isdir(log_dir):
        raise PlotError(f"{run_dir}: no tensorboard folder; pass a run's output_dir")
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if not tags:
        raise PlotError(f"{log_dir}: no scalars logged yet")
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in tags}


def plot_runs(run_dirs: list[str], out_dir: str) -> list[str]:
    """The PNGs written for ``run_dirs`` into ``out_dir``; prints a line for each panel skipped."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    runs = {os.path.basename(os.path.normpath(d)) or d: read_scalars(d) for d in run_dirs}
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for filename, title, series in PANELS:
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for name, scalars in runs.items():
            for tag, suffix in series:
                points = scalars.get(tag)
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=f"{name}{suffix}")
                    drawn += 1
        if not drawn:
            plt.close(fig)
            print(f"plot_run: skipped {filename}: no run logged {', '.join(t for t, _ in series)}")
            continue
        if filename == "eval_reward_accuracy.png":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        path = os.path.join(out_dir, filename)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="a run's output_dir (several: compared)")
    parser.add_argument("--out", help="where the PNGs go (default: the first run's OUTPUT_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_runs(args.runs, args.out or os.path.join(args.runs[0], "plots"))
    except PlotError as err:
        print(f"plot_run: error: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
