"""How tools/quality_bench.py shows its results: the markdown table of held-out reward accuracy and
pass rate, the reward-accuracy curves and KTO's reference point against its rewards."""

from __future__ import annotations

from pathlib import Path

__all__ = ["print_table", "plot", "plot_mechanism"]


def print_table(report: dict, tasks: list[str], betas: list[float], labels: list[str]) -> None:
    by = {(r["task"], r["label"], r["beta"]): r for r in report["runs"]}
    head = "| method | " + " | ".join(f"{t} β={b:g}" for t in tasks for b in betas) + " |"
    print("\nheld-out reward accuracy / greedy pass rate, after "
          f"{report['settings']['steps']} steps of {report['settings']['completions']} completions")
    print(head)
    print("|---" * (1 + len(tasks) * len(betas)) + "|")
    start = report["sft_pass_rate"]
    print("| start | " + " | ".join("0.5 / " + ("-" if start[t] is None else f"{start[t]:.2f}")
                                   for t in tasks for _ in betas) + " |")
    for label in labels:
        cells = []
        for t in tasks:
            for b in betas:
                r = by[(t, label, b)]
                cells.append(r["error"][:40] if "error" in r else f"{r['reward_accuracy']:.3f} / {r['pass_rate']:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


def plot(report: dict, path: Path, tasks: list[str], betas: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(betas), len(tasks), figsize=(4 * len(tasks), 3 * len(betas)), squeeze=False)
    for i, b in enumerate(betas):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            for r in report["runs"]:
                if r["task"] == t and r["beta"] == b and "curve" in r:
                    steps, acc = zip(*[(0, 0.5), *r["curve"]])  # step 0: the policy is the reference
                    ax.plot(steps, acc, label=r["label"])
            ax.set_title(f"{t}, β={b:g}")
            ax.set_ylim(0.4, 1.0)
            ax.set_xlabel("step")
            ax.set_ylabel("held-out reward accuracy")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_mechanism(report: dict, path: Path, tasks: list[str], betas: list[float]) -> None:
    """Per task and beta, the first KTO run's reference point z_ref against its rewards (means over
    windows of 25 steps): where z_ref sits between the two classes' rewards, it eats the margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(betas), len(tasks), figsize=(4 * len(tasks), 3 * len(betas)), squeeze=False)
    for i, b in enumerate(betas):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            run = next((r for r in report["runs"] if r["task"] == t and r["beta"] == b
                        and r.get("mechanism", {}).get("kl/z_ref")), None)
            ax.set_title(f"{t}, β={b:g}" + (f", {run['label']}" if run else ": no KTO run"))
            if run is None:
                continue
            for key, label in (("rewards/chosen", "reward, desirable"), ("rewards/rejected", "reward, undesirable"),
                               ("kl/z_ref", "z_ref")):
                points = run["mechanism"].get(key, [])
                windows = [points[k:k + 25] for k in range(0, len(points), 25)]
                ax.plot([w[-1][0] for w in windows], [sum(v for _, v in w) / len(w) for w in windows], label=label)
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
