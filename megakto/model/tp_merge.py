"""Joining tensor-parallel shards back into whole Hugging Face tensors.

AutoTP splits each linear layer along one dimension: column-parallel layers (q/k/v, gate/up, the
vocabulary-parallel output head) keep ``1/tp`` of the output rows, row-parallel ones (o_proj,
down_proj) ``1/tp`` of the input columns; norms and the input embedding stay whole on every rank.
The shards do not say which, but the full shapes do: a tensor whose shard shape equals the model's
is replicated, one whose dimension ``d`` is ``1/tp`` of the model's is concatenated along ``d`` in
tp-rank order.

Pure: shards in, tensors out. The full shapes come from the model config
(:func:`full_shapes`, a meta-device model), so the same code joins an offline checkpoint's
per-``mp_rank`` files and a live engine's gathered shards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from megakto.errors import ModelError

__all__ = ["merge_tp_shards", "join_shard_shapes", "full_shapes", "tied_aliases"]


def merge_tp_shards(shards: Sequence[Mapping[str, torch.Tensor]], shapes: Mapping[str, Sequence[int]],
                    warn: Callable[[str], None] | None = None,
                    aliases: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """One state dict from ``shards`` (one per tp rank, in rank order) given each tensor's whole
    ``shapes``. A replicated tensor is taken from rank 0. Its copies should be equal (each TP rank
    applies the same update to it); where they are not (non-deterministic kernels can make them
    drift), ``warn`` is told the largest difference, and without ``warn`` it is an error.

    ``aliases`` (:func:`tied_aliases`): tied names and the tensor they are. A checkpoint records a
    tied tensor under its alias on some ranks only (zero_to_fp32 restores the shared name where
    that rank's file lists it), so aliases are set aside, the tensors joined, and each alias that
    some shard held given its source's whole tensor."""
    tp = len(shards)
    if tp == 1:
        return dict(shards[0])
    held = {name for s in shards for name in s if name in (aliases or {})}
    aliases = {alias: source for alias, source in (aliases or {}).items() if alias in held}
    shards = [{k: v for k, v in s.items() if k not in aliases} for s in shards]
    names = list(shards[0])
    for r, shard in enumerate(shards[1:], 1):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))[:3]
            raise ModelError(f"tensor-parallel shards disagree on their tensors: rank 0 vs rank {r} differ in {diff}")
    merged = {}
    for name in names:
        parts = [s[name] for s in shards]
        if name not in shapes:
            raise ModelError(f"tensor-parallel shard {name} is not a tensor of the model config")
        want = tuple(shapes[name])
        have = tuple(parts[0].shape)
        if any(tuple(p.shape) != have for p in parts):
            raise ModelError(f"{name}: tensor-parallel shards have different shapes {[tuple(p.shape) for p in parts]}")
        if have == want:
            if not all(torch.equal(parts[0], p) for p in parts[1:]):
                diff = max(float((p.float() - parts[0].float()).abs().max()) for p in parts[1:])
                message = (f"{name}: replicated on every tensor-parallel rank but the copies differ by up to "
                           f"{diff:.3g}; rank 0's copy is used")
                if warn is None:
                    raise ModelError(message)
                warn(message)
            merged[name] = parts[0]
            continue
        split = [d for d in range(len(want)) if len(have) == len(want) and have[d] * tp == want[d]
                 and all(have[e] == want[e] for e in range(len(want)) if e != d)]
        if len(split) != 1:
            raise ModelError(f"{name}: a tensor-parallel shard of shape {have} is not 1/{tp} of the model's "
                             f"{want} along one dimension")
        merged[name] = torch.cat(parts, dim=split[0])
    for alias, source in aliases.items():
        if source in merged:
            merged[alias] = merged[source]
    return merged


def join_shard_shapes(shards: Sequence[Mapping[str, Sequence[int]]], whole: Mapping[str, Sequence[int]]
                      ) -> dict[str, list[int] | str]:
    """The whole shape of every parameter from its shapes on each tp rank (``shards``, in rank
    order), read against a model's ``whole`` shapes as :func:`merge_tp_shards` reads tensors: a
    shard as large as the whole is replicated, shards that add up to it along one dimension (the
    others equal) are its pieces; both give the whole shape. Anything else cannot be that model's
    and is described as held (``"[32, 64] on each of 2 tensor-parallel ranks"``), for the error
    that names it. One shard: its shapes as they are."""
    if len(shards) == 1:
        return {name: list(shape) for name, shape in shards[0].items()}
    joined: dict[str, list[int] | str] = {}
    for name in dict.fromkeys(n for s in shards for n in s):
        parts = [list(s[name]) if name in s else None for s in shards]
        want = list(whole.get(name) or [])
        if None not in parts and all(p == want for p in parts):
            joined[name] = want
            continue
        # Shards of want's rank: joined along the one dimension where they differ from it (the others
        # equal), want itself if they add up to it there (pieces), else not this model's shape.
        comparable = None not in parts and want and all(len(p) == len(want) for p in parts)
        off = [d for d in range(len(want)) if any(p[d] != want[d] for p in parts)] if comparable else []
        if len(off) == 1:
            joined[name] = [sum(p[d] for p in parts) if d == off[0] else want[d] for d in range(len(want))]
            continue
        held = {str(p) for p in parts if p is not None}
        joined[name] = (f"{held.pop()} on each of {len(shards)} tensor-parallel ranks" if len(held) == 1
                        and None not in parts else f"{parts} on the {len(shards)} tensor-parallel ranks")
    return joined


def full_shapes(config, *, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Every parameter's whole shape for a Hugging Face model config, from a meta-device model
    (nothing allocated). Build it outside any live ZeRO-3 config
    (:func:`megakto.distributed.engine.outside_zero3`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def tied_aliases(config, *, trust_remote_code: bool = False) -> dict[str, str]:
    """``{alias: source}`` of the parameters a Hugging Face model config ties (the output head to
    the input embedding), from a meta-device model: every name beyond the first of one parameter.
    Build it outside any live ZeRO-3 config, as :func:`full_shapes`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases
