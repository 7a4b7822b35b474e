"""tools/bench.py's report: each system's median run, the figures derived from several systems
(precompute amortised, tokens per CPU second), their ratios and the markdown table."""

from __future__ import annotations

__all__ = ["COLUMNS", "GPU_COLUMNS", "RATIOS", "add_derived", "markdown", "median_run", "ratios"]

# (label, numerator, denominator, figure)
RATIOS = [
    ("megakto KTO / megakto SFT, tokens/s", "megakto-kto", "megakto-sft", "tokens_per_s"),
    ("megakto KTO cached / megakto SFT, tokens/s", "megakto-kto-cached", "megakto-sft", "tokens_per_s"),
    ("megakto KTO cached / megakto SFT, tokens/s incl. precompute", "megakto-kto-cached", "megakto-sft",
     "tokens_per_s_incl_precompute"),
    ("megakto KTO / TRL KTO (online), tokens/s", "megakto-kto", "trl-kto", "tokens_per_s"),
    ("megakto KTO cached / TRL KTO precomputed, tokens/s", "megakto-kto-cached", "trl-kto-precomputed",
     "tokens_per_s"),
    ("megakto KTO cached / TRL KTO precomputed, tokens/s incl. precompute", "megakto-kto-cached",
     "trl-kto-precomputed", "tokens_per_s_incl_precompute"),
    ("megakto KTO / TRL KTO (online), tokens per CPU second", "megakto-kto", "trl-kto", "tokens_per_cpu_s"),
    ("megakto KTO cached / TRL KTO precomputed, tokens per CPU second", "megakto-kto-cached",
     "trl-kto-precomputed", "tokens_per_cpu_s"),
    ("megakto KTO / TRL KTO (online), peak beyond setup", "megakto-kto", "trl-kto", "peak_beyond_setup_mib"),
    ("megakto KTO cached / TRL KTO precomputed, peak beyond setup", "megakto-kto-cached",
     "trl-kto-precomputed", "peak_beyond_setup_mib"),
    ("megakto KTO / TRL KTO (online), peak beyond warm state", "megakto-kto", "trl-kto", "peak_beyond_warm_mib"),
    ("megakto KTO / TRL KTO (online), peak RSS", "megakto-kto", "trl-kto", "peak_rss_mib"),
    ("megakto KTO cached / TRL KTO precomputed, peak RSS", "megakto-kto-cached", "trl-kto-precomputed",
     "peak_rss_mib"),
    ("megakto KTO / megakto SFT, peak GPU memory", "megakto-kto", "megakto-sft", "peak_gpu_mib"),
    ("megakto KTO / TRL KTO (online), peak GPU memory", "megakto-kto", "trl-kto", "peak_gpu_mib"),
    ("megakto KTO cached / TRL KTO precomputed, peak GPU memory", "megakto-kto-cached", "trl-kto-precomputed",
     "peak_gpu_mib"),
]

COLUMNS = [  # (header, key, format)
    ("system", "system", "{}"),
    ("target tokens/s", "tokens_per_s", "{:.0f}"),
    ("samples/s", "samples_per_s", "{:.2f}"),
    ("s/step", "seconds_per_step", "{:.2f}"),
    ("CPU s/step", "cpu_s_per_step", "{:.2f}"),
    ("precompute s", "precompute_s", "{:.1f}"),
    ("tokens/s incl. precompute", "tokens_per_s_incl_precompute", "{:.0f}"),
    ("setup s", "setup_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("peak beyond setup MiB", "peak_beyond_setup_mib", "{:.0f}"),
    ("peak beyond warm state MiB", "peak_beyond_warm_mib", "{:.0f}"),
]
GPU_COLUMNS = [  # shown when some system ran on a GPU
    ("peak GPU MiB", "peak_gpu_mib", "{:.0f}"),
    ("peak GPU reserved MiB", "peak_gpu_reserved_mib", "{:.0f}"),
]


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower one of the middle two), every run's figure
    attached; a failed run makes the system failed."""
    failed = [r for r in runs if not r.get("ok")]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    chosen["runs_peak_beyond_warm_mib"] = [r["peak_beyond_warm_mib"] for r in runs]
    return chosen


def add_derived(results: dict[str, dict], n_rows: int) -> None:
    """Fill megakto's precompute from setup times when the trainer does not expose it, and the
    throughput with the precompute amortised over one epoch of the benchmark's rows."""
    online, cached = results.get("megakto-kto", {}), results.get("megakto-kto-cached", {})
    if cached.get("ok") and cached.get("precompute_s") is None and online.get("ok"):
        cached["precompute_s"] = max(0.0, cached["setup_s"] - online["setup_s"])
        cached["precompute_note"] = "setup time minus megakto-kto's"
    for r in results.values():
        if not r.get("ok"):
            continue
        pre = r.get("precompute_s") or 0.0
        # The pass covers every row once; charge the timed steps their share of it.
        share = pre * r["rows"] / n_rows
        r["tokens_per_s_incl_precompute"] = r["target_tokens"] / (r["timed_s"] + share)
        r["tokens_per_cpu_s"] = r["target_tokens"] / (r["cpu_s_per_step"] * r["timed_steps"])


def ratios(results: dict[str, dict], defs: list[tuple[str, str, str, str]] = RATIOS,
           ) -> list[tuple[str, float | None]]:
    """(label, numerator's figure / denominator's) for each of ``defs``; None where either is missing."""
    out = []
    for label, num, den, key in defs:
        a, b = results.get(num, {}), results.get(den, {})
        ok = a.get("ok") and b.get("ok") and a.get(key) is not None and b.get(key)
        out.append((label, a[key] / b[key] if ok else None))
    return out


def markdown(results: dict[str, dict], ratio_rows: list[tuple[str, float | None]]) -> str:
    columns = COLUMNS + (GPU_COLUMNS if any("peak_gpu_mib" in r for r in results.values()) else [])
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for name, r in results.items():
        if not r.get("ok"):
            lines.append(f"| {name} | failed: {r.get('error', '?')} |" + " |" * (len(columns) - 2))
            continue
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    shown = [(label, v) for label, v in ratio_rows if v is not None]
    if shown:
        lines += ["", "| ratio | value |", "|---|---|"] + [f"| {label} | {v:.2f} |" for label, v in shown]
    return "\n".join(lines)
