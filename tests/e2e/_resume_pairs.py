"""Resume on another shape, as issue-level pairs: run A uninterrupted on the source layout (8 steps,
a checkpoint every 4), run B resumed from A's step-4 checkpoint on the target layout to step 8, and
compare B's steps 5-8 with A's: the same rows in the same order, loss and KL within 1e-6 per step,
and the final weights (read from each run's step-8 checkpoint under Hugging Face names, whatever its
layout) within 1e-5 of A's.

Every comparison's largest differences are appended, one JSON line a pair, to the file named by
``$MEGAKTO_RESUME_TABLE`` when it is set; with ``$MEGAKTO_RESUME_FLOOR`` set too, each pair also
runs the target layout uninterrupted (run C) and records how far C's steps 5-8 are from A's: the
floor of another layout's arithmetic, which a resume cannot go below; ``tools/resume_matrix.sh`` runs the pairs and prints that
file as the README's table. The CI suite runs one pair per mechanism (tests/e2e/test_resume_anywhere.py);
the whole matrix (tests/e2e/resume_matrix.py, not collected by the default run) runs through the tool.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from tests.e2e.conftest import run_trainer

__all__ = ["RUN", "Layout", "run_source", "resume_on", "compare", "final_weights"]

# Adam's eps at 1e-4 so that rounding of another reduction order is not amplified by 1/sqrt(v).
RUN = {"train.max_steps": 8, "checkpoint.every_steps": 4, "checkpoint.keep_last": 3, "optim.eps": 1e-4}
LOSS_ABS = KL_ABS = 1e-6
WEIGHT_ABS = 1e-5


@dataclass(frozen=True)
class Layout:
    """A cluster shape: ``name`` as the table prints it (``ZeRO-3 DP2``, ``TP2 × DP2``), the number
    of processes, the DeepSpeed JSON and the overrides (``parallel.*``, ``model.lora_*`` ...)."""

    name: str
    nproc: int
    ds: str = "ds_configs/zero3.json"
    settings: dict = field(default_factory=dict)


def run_source(assets, out, layout: Layout, **extra) -> dict:
    """Run A: ``layout`` uninterrupted to step 8, saving at 4 and 8. Returns what :func:`resume_on`
    and :func:`compare` need."""
    _, result = run_trainer(assets, out, nproc=layout.nproc, ds=layout.ds, **RUN, **layout.settings, **extra)
    return {"layout": layout, "out": out, "result": result, "extra": extra, "assets": assets,
            "tag": str(out / "checkpoints" / "step-00000004")}


def resume_on(assets, source: dict, out, layout: Layout, *, resume: str | None = None) -> tuple[str, dict]:
    """Run B: ``layout`` resumed from ``resume`` (default: A's step-4 tag) to step 8; returns its log
    and result."""
    proc, result = run_trainer(assets, out, nproc=layout.nproc, ds=layout.ds,
                               **{**RUN, **layout.settings, **source["extra"], "train.resume": resume or source["tag"]})
    return proc.stdout + proc.stderr, result


def final_weights(out) -> dict[str, torch.Tensor]:
    """The step-8 checkpoint's weights under Hugging Face names (any layout)."""
    from megakto.checkpoint import read_weights

    return read_weights(str(out / "checkpoints" / "step-00000008"))


def _floor(source: dict, target: Layout, out) -> dict:
    """Run C: ``target`` uninterrupted; its steps 5-8 against A's (loss and KL) and its rows."""
    floor_out = out.parent / f"{out.name}-floor"
    _, c = run_trainer(source["assets"], floor_out, nproc=target.nproc, ds=target.ds,
                       **{**RUN, **target.settings, **source["extra"]})
    a, b = source["result"]["history"][4:8], c["history"][4:8]
    return {"floor_loss": max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)),
            "floor_kl": max(abs(x["kl"] - y["kl"]) for x, y in zip(a, b)),
            "floor_rows_same": source["result"]["indices"] == c["indices"]}


def _diffs(source: dict, result: dict, out) -> dict:
    want = source["result"]
    a, b = want["history"][4:8], result["history"]
    weights_b, weights_a = final_weights(out), final_weights(source["out"])
    names = sorted(weights_a)
    return {
        "steps": len(b),
        "rows_same": want["indices"][4:8] == result["indices"],
        "loss": max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)),
        "kl": max(abs(x["kl"] - y["kl"]) for x, y in zip(a, b)),
        "margin": max(abs(x["rewards/margins"] - y["rewards/margins"]) for x, y in zip(a, b)),
        "grad_norm_rel": max(abs(x["grad_norm"] - y["grad_norm"]) / max(abs(x["grad_norm"]), 1e-12)
                             for x, y in zip(a, b)),
        "same_names": sorted(weights_b) == names,
        "weights": max((float((weights_a[k].detach().float() - weights_b[k].detach().float()).abs().max()) for k in names
                        if k in weights_b and weights_a[k].shape == weights_b[k].shape), default=float("inf")),
        "bitwise": sorted(weights_b) == names and all(torch.equal(weights_a[k], weights_b[k]) for k in names),
    }


def compare(pair: str, source: dict, target: Layout, result: dict, out, *, loss_abs: float = LOSS_ABS,
            kl_abs: float = KL_ABS, weight_abs: float = WEIGHT_ABS) -> dict:
    """Assert run B (``result``, written to ``out``) continues run A (``source``) on ``target``, and
    record the differences under ``pair``; returns them."""
    d = _diffs(source, result, out)
    table = os.environ.get("MEGAKTO_RESUME_TABLE")
    if table and os.environ.get("MEGAKTO_RESUME_FLOOR"):
        d.update(_floor(source, target, out))
    if table:
        with open(table, "a") as f:
            f.write(json.dumps({"pair": pair, "source": source["layout"].name, "target": target.name, **d}) + "\n")
    assert d["steps"] == 4, d
    assert d["rows_same"], (pair, source["result"]["indices"][4:8], result["indices"])
    assert d["loss"] <= loss_abs and d["kl"] <= kl_abs and d["margin"] <= loss_abs, (pair, d)
    assert d["grad_norm_rel"] <= 1e-5, (pair, d)
    assert d["same_names"] and d["weights"] <= weight_abs, (pair, d)
    return d


def table_rows(path: str) -> list[dict]:
    """The recorded pairs, last record of each pair."""
    rows = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            rows[row["pair"]] = row
    return list(rows.values())


if __name__ == "__main__":  # tools/resume_matrix.sh: print the table
    import sys

    rows = table_rows(sys.argv[1])
    floor = any("floor_kl" in r for r in rows)
    print("| source | target | rows | max |Δloss| | max |ΔKL| | max |Δweight| | bitwise |"
          + (" uninterrupted target: max |Δloss|, max |ΔKL| |" if floor else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if floor else ""))
    for r in rows:
        extra = ""
        if floor:
            extra = (f" {r['floor_loss']:.1e}, {r['floor_kl']:.1e}{'' if r['floor_rows_same'] else ' (other rows)'} |"
                     if "floor_kl" in r else " - |")
        print(f"| {r['source']} | {r['target']} | {'same' if r['rows_same'] else 'DIFFER'} | {r['loss']:.1e} | "
              f"{r['kl']:.1e} | {r['weights']:.1e} | {'yes' if r['bitwise'] else 'no'} |" + extra)
