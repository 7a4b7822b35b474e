"""Convert paired preference rows (prompt, chosen, rejected) into KTO rows (prompt, completion, label).

    python tools/pairs_to_kto.py pairs.jsonl kto.jsonl [--one-y-per-x] [--desirable-fraction F] [--seed S]

By default each pair gives two rows: chosen with label true, rejected with label false.
--one-y-per-x keeps one row per distinct prompt (a seeded coin picks chosen or rejected), the
setting in which KTO still matches DPO without any pairs (Ethayarajh et al. 2024, sec. 4.3).
--desirable-fraction F subsamples the over-represented class so desirable rows make up F of the
output, e.g. 0.0909 for the paper's 1:10 imbalance experiments; the eq. (8) weights then need
setting to match.

Paired conversations, rows with ``chosen`` and ``rejected`` lists of messages and no ``prompt``
(the whole conversation each, as in Anthropic's HH-RLHF in messages form), become conversation
rows ``{"messages": chosen, "label": true}`` and ``{"messages": rejected, "label": false}``, with
the row's ``tools`` when it has them; --one-y-per-x then groups them by the messages the two
share at the start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/_jsonl.py, however the script is loaded

import datasets  # noqa: E402

from megakto.data.rows import read_source  # noqa: E402
from megakto.errors import DataError, MegaktoError  # noqa: E402
from _jsonl import write_jsonl  # noqa: E402


def convert(rows, one_y_per_x: bool = False, desirable_fraction: float | None = None,
            seed: int = 0, source: str = "<rows>") -> list[dict]:
    """Pairs -> KTO rows, in input order. ``rows`` is an iterable of dicts."""
    rng = random.Random(seed)
    pairs = []
    for i, r in enumerate(rows, start=1):
        fields = ("chosen", "rejected") if _is_conversation_pair(r) else ("prompt", "chosen", "rejected")
        for f in fields:
            if r.get(f) is None:
                raise DataError(f"{source}: row {i}: field '{f}' is missing")
        pairs.append(r)
    if one_y_per_x:
        by_prompt = {}
        for r in pairs:
            by_prompt.setdefault(json.dumps(_shared_prompt(r), sort_keys=True), []).append(r)
        picked = [rng.choice(group) for group in by_prompt.values()]
        out = [_row(r, rng.random() < 0.5) for r in picked]
    else:
        out = [row for r in pairs for row in (_row(r, True), _row(r, False))]
    if desirable_fraction is not None:
        out = _subsample(out, desirable_fraction, rng)
    return out


def _is_conversation_pair(pair: dict) -> bool:
    """Whole conversations in chosen and rejected, no separate prompt."""
    return pair.get("prompt") is None and all(isinstance(pair.get(f), list) for f in ("chosen", "rejected"))


def _shared_prompt(pair: dict):
    """What the pair's two rows share: the prompt, or for conversations their common first messages."""
    if not _is_conversation_pair(pair):
        return pair["prompt"]
    shared = []
    for a, b in zip(pair["chosen"], pair["rejected"]):
        if a != b:
            break
        shared.append(a)
    return shared


def _row(pair: dict, desirable: bool) -> dict:
    completion = pair["chosen" if desirable else "rejected"]
    if _is_conversation_pair(pair):
        row = {"messages": completion, "label": desirable}
        if pair.get("tools") is not None:
            row["tools"] = pair["tools"]
        return row
    return {"prompt": pair["prompt"], "completion": completion, "label": desirable}


def _subsample(rows: list[dict], fraction: float, rng: random.Random) -> list[dict]:
    """Drop rows of the over-represented class only, so desirable ones are ``fraction`` of all."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--desirable-fraction must be in [0, 1], got {fraction}")
    des = [i for i, r in enumerate(rows) if r["label"]]
    und = [i for i, r in enumerate(rows) if not r["label"]]
    if len(des) > fraction * len(rows):  # too many desirable: keep all undesirable
        keep_n = math.floor(fraction * len(und) / (1 - fraction) + 0.5)  # fraction < 1 here
        keep = set(und) | set(rng.sample(des, min(keep_n, len(des))))
    else:
        keep_n = len(und) if fraction == 0.0 else math.floor(len(des) * (1 - fraction) / fraction + 0.5)
        keep = set(des) | set(rng.sample(und, min(keep_n, len(und))))
    return [r for i, r in enumerate(rows) if i in keep]


def _counts(rows) -> tuple[int, int]:
    n_des = sum(1 for r in rows if r["label"])
    return n_des, len(rows) - n_des


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help=".jsonl/.json/.parquet/.csv file, save_to_disk folder or hub name")
    ap.add_argument("output", help="KTO rows written as JSON lines")
    ap.add_argument("--one-y-per-x", action="store_true", help="keep one completion per prompt")
    ap.add_argument("--desirable-fraction", type=float, default=None, metavar="F",
                    help="subsample so desirable rows are this fraction of the output")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.desirable_fraction is not None and not 0.0 <= args.desirable_fraction <= 1.0:
        ap.error(f"--desirable-fraction must be in [0, 1], got {args.desirable_fraction}")
    try:
        ds = read_source(args.input)
        # Without a prompt column, chosen and rejected hold whole conversations.
        needed = ("prompt", "chosen", "rejected") if "prompt" in ds.column_names else ("chosen", "rejected")
        missing = [f for f in needed if f not in ds.column_names]
        if missing or "prompt" not in ds.column_names and not isinstance(ds.features["chosen"], datasets.List):
            raise DataError(f"{args.input}: row 1: field '{(missing or ['prompt'])[0]}' is missing "
                            f"(columns: {', '.join(ds.column_names)})")
        keep = [f for f in (*needed, "tools") if f in ds.column_names]
        rows = convert(ds.select_columns(keep), args.one_y_per_x, args.desirable_fraction, args.seed,
                       source=args.input)
    except MegaktoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_jsonl(args.output, rows)
    d_out, u_out = _counts(rows)
    print(f"in: {len(ds)} pairs ({len(ds)} chosen, {len(ds)} rejected); out: {len(rows)} rows "
          f"({d_out} desirable, {u_out} undesirable) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
