"""DeepSpeed AutoEP's parameter names and layouts <-> the Hugging Face mixture-of-experts ones.

AutoEP (``parallel.ep_size`` > 1) replaces each HF MoE block ``model.layers.N.mlp`` with a layer
of its own whose parameters are named and cut differently. For the transformers 5 families it has
presets for (Qwen3-MoE, Qwen2-MoE; their experts are one module of fused 3-D tensors)::

    HF (modeling_qwen3_moe.py)                       AutoEP (deepspeed.module_inject.auto_ep_layer)
    mlp.gate.weight             [E, H]               mlp.router.gate.weight   [E, H]
                                                     mlp.gate.gate.weight     the same tensor again
                                                                              (``mlp.gate`` aliases the router)
    mlp.experts.gate_up_proj    [E, 2I, H]           mlp.experts.w1 [E, I, H] (gate: rows :I)
                                                     mlp.experts.w3 [E, I, H] (up: rows I:)
    mlp.experts.down_proj       [E, H, I]            mlp.experts.w2 [E, H, I]
    mlp.shared_expert.*                              mlp.shared_experts.*
    mlp.shared_expert_gate.*                         mlp.shared_experts_gate.*

(``gate_up_proj`` rows are gate then up: HF's forward ``linear(x, gate_up_proj[e]).chunk(2)``,
AutoEP's repacking ``deepspeed.moe.ep_repack`` of the ``gate_up_first`` layout.) ``E`` is every
expert: the tensors here are whole, gathered over the expert-parallel ranks (a universal
checkpoint's are). The maps are elementwise, so the same renaming serves the weights and each of
Adam's moments.

Pure: tensors in, tensors out; no process group, no DeepSpeed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from megakto.errors import ModelError

__all__ = ["is_autoep", "autoep_to_hf", "hf_to_autoep", "hf_shapes"]

_BLOCK = r"(?P<block>.*\.mlp)\."
_AUTOEP_EXPERT = re.compile(_BLOCK + r"experts\.(?P<w>w[123])$")
_HF_EXPERT = re.compile(_BLOCK + r"experts\.(?P<w>gate_up_proj|down_proj)$")
_ROUTER, _ROUTER_ALIAS, _HF_ROUTER = "router.gate.", "gate.gate.", "gate."
# (AutoEP prefix inside the block, HF prefix): plain renames; the router's alias is dropped.
_RENAMES = ((_ROUTER, _HF_ROUTER), ("shared_experts_gate.", "shared_expert_gate."),
            ("shared_experts.", "shared_expert."))


def is_autoep(names) -> bool:
    """Whether ``names`` (a state dict's keys) are AutoEP's: some block holds ``experts.w1``."""
    return any(name.endswith(".mlp.experts.w1") for name in names)


def _rename(name: str, pairs, block_of: Callable[[str], str | None]) -> str:
    block = block_of(name)
    if block is None:
        return name
    rest = name[len(block):]
    for old, new in pairs:
        if rest.startswith(old):
            return block + new + rest[len(old):]
    return name


def _moe_block(blocks: set[str]) -> Callable[[str], str | None]:
    """``name`` -> its MoE block prefix (``model.layers.N.mlp.``) if it lies in one of ``blocks``."""
    def block_of(name: str) -> str | None:
        head = name.split(".mlp.", 1)[0] + ".mlp"
        return head + "." if ".mlp." in name and head in blocks else None
    return block_of


def autoep_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoEP's names and expert layout -> the Hugging Face ones (table above); every other name
    unchanged. Each MoE block must hold all three of ``w1``, ``w2``, ``w3`` with matching expert
    counts; the router's alias ``mlp.gate.gate.*`` is dropped."""
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if m := _AUTOEP_EXPERT.match(name):
            experts.setdefault(m["block"], {})[m["w"]] = tensor
    block_of = _moe_block(set(experts))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if _AUTOEP_EXPERT.match(name):
            continue
        block = block_of(name)
        if block is not None and name[len(block):].startswith(_ROUTER_ALIAS):
            continue
        out[_rename(name, _RENAMES, block_of)] = tensor
    for block, ws in experts.items():
        if sorted(ws) != ["w1", "w2", "w3"]:
            raise ModelError(f"{block}: AutoEP experts {sorted(ws)}, expected w1, w2 and w3")
        w1, w2, w3 = ws["w1"], ws["w2"], ws["w3"]
        if w1.dim() != 3 or w1.shape != w3.shape or w2.shape != (w1.shape[0], w1.shape[2], w1.shape[1]):
            raise ModelError(f"{block}: AutoEP expert shapes w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)}, "
                             f"w2 {tuple(w2.shape)} are not [E, I, H], [E, I, H], [E, H, I]")
        out[f"{block}.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        out[f"{block}.experts.down_proj"] = w2
    return out


def hf_to_autoep(state: Mapping[str, torch.Tensor], *, router_alias: bool = False) -> dict[str, torch.Tensor]:
    """The Hugging Face names and expert layout -> AutoEP's, the inverse of :func:`autoep_to_hf`
    (``router_alias``: also give the router under its alias ``mlp.gate.gate.*``, as AutoEP's own
    state dict does). Blocks are recognised by ``experts.gate_up_proj``; other names unchanged."""
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if m := _HF_EXPERT.match(name):
            experts.setdefault(m["block"], {})[m["w"]] = tensor
    block_of = _moe_block(set(experts))
    back = tuple((new, old) for old, new in _RENAMES)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if _HF_EXPERT.match(name):
            continue
        renamed = _rename(name, back, block_of)
        out[renamed] = tensor
        block = block_of(name)
        if router_alias and block is not None and renamed[len(block):].startswith(_ROUTER):
            out[block + _ROUTER_ALIAS + renamed[len(block) + len(_ROUTER):]] = tensor
    for block, ws in experts.items():
        if sorted(ws) != ["down_proj", "gate_up_proj"]:
            raise ModelError(f"{block}: experts {sorted(ws)}, expected gate_up_proj and down_proj")
        gate_up, down = ws["gate_up_proj"], ws["down_proj"]
        if gate_up.dim() != 3 or gate_up.shape[1] % 2 or down.shape != (
                gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2):
            raise ModelError(f"{block}: expert shapes gate_up_proj {tuple(gate_up.shape)}, down_proj "
                             f"{tuple(down.shape)} are not [E, 2I, H], [E, H, I]")
        w1, w3 = gate_up.chunk(2, dim=1)
        out[f"{block}.experts.w1"], out[f"{block}.experts.w3"] = w1.contiguous(), w3.contiguous()
        out[f"{block}.experts.w2"] = down
    return out


def hf_shapes(shapes: Mapping[str, list[int]], ep_size: int) -> dict[str, list[int]]:
    """Parameter shapes as an AutoEP engine holds them (each rank ``1/ep_size`` of the experts:
    ``[E / ep_size, ...]``) -> the Hugging Face model's (names, whole expert counts); shapes
    without AutoEP names come back as they are. Comparable across expert-parallel sizes."""
    if not is_autoep(shapes):
        return {name: list(shape) for name, shape in shapes.items()}
    meta = {name: torch.empty([shape[0] * ep_size, *shape[1:]] if _AUTOEP_EXPERT.match(name) else shape,
                              device="meta") for name, shape in shapes.items()}
    return {name: list(t.shape) for name, t in autoep_to_hf(meta).items()}
