"""megakto.model.expert_names: AutoEP's expert names and layout <-> the Hugging Face ones, on
hand-made tensors; the HF model's own expert forward checks which rows of gate_up_proj are gate."""

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from megakto.errors import ModelError
from megakto.model.expert_names import autoep_to_hf, hf_shapes, hf_to_autoep, is_autoep

E, I, H = 2, 3, 4  # experts, expert intermediate size, hidden size
L0 = "model.layers.0.mlp."


def _autoep():
    """Every element its own value: w1[e, i, h] = 100 + 12e + 4i + h, w3 = w1 + 1000, w2 = -(...)."""
    w1 = 100 + torch.arange(E * I * H, dtype=torch.float32).view(E, I, H)
    return {"model.embed_tokens.weight": torch.zeros(8, H),
            L0 + "router.gate.weight": torch.arange(E * H, dtype=torch.float32).view(E, H),
            L0 + "gate.gate.weight": torch.arange(E * H, dtype=torch.float32).view(E, H),
            L0 + "experts.w1": w1, L0 + "experts.w3": w1 + 1000,
            L0 + "experts.w2": -torch.arange(E * H * I, dtype=torch.float32).view(E, H, I),
            "model.layers.0.self_attn.q_proj.weight": torch.ones(H, H)}


def test_autoep_to_hf_by_hand():
    """gate_up_proj[e] is w1[e] (rows 0..I-1) over w3[e] (rows I..2I-1): gate_up_proj[1, 4, 2] is
    w3[1, 1, 2] = 1000 + 100 + 12 + 4 + 2 = 1118; gate_up_proj[0, 2, 3] is w1[0, 2, 3] = 111. The
    router keeps its [E, H] tensor under mlp.gate.weight, its alias goes, the rest is untouched."""
    hf = autoep_to_hf(_autoep())
    assert sorted(hf) == sorted(["model.embed_tokens.weight", L0 + "gate.weight", L0 + "experts.gate_up_proj",
                                 L0 + "experts.down_proj", "model.layers.0.self_attn.q_proj.weight"])
    gate_up = hf[L0 + "experts.gate_up_proj"]
    assert gate_up.shape == (E, 2 * I, H)
    assert gate_up[1, 4, 2] == 1118 and gate_up[0, 2, 3] == 111
    assert torch.equal(hf[L0 + "experts.down_proj"], _autoep()[L0 + "experts.w2"])
    assert torch.equal(hf[L0 + "gate.weight"], _autoep()[L0 + "router.gate.weight"])
    assert is_autoep(_autoep()) and not is_autoep(hf)


def test_round_trip_and_shared_experts():
    autoep = {**_autoep(), L0 + "shared_experts.up_proj.weight": torch.ones(I, H),
              L0 + "shared_experts_gate.weight": torch.ones(1, H)}
    hf = autoep_to_hf(autoep)
    assert L0 + "shared_expert.up_proj.weight" in hf and L0 + "shared_expert_gate.weight" in hf
    back = hf_to_autoep(hf, router_alias=True)
    assert sorted(back) == sorted(autoep)
    assert all(torch.equal(back[k], autoep[k]) for k in autoep)
    assert sorted(hf_to_autoep(hf)) == sorted(k for k in autoep if ".gate.gate." not in k)


def test_gate_rows_as_the_hf_forward_uses_them():
    """Qwen3MoeExperts (transformers 5) computes expert e as down_proj[e] @ (silu(gate x) * up x);
    AutoEP's GroupedExperts as w2[e] @ (silu(w1[e] x) * w3[e] x). With the weights of one renamed
    into the other, both give the same output."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=1)
    config._experts_implementation = "eager"
    experts = Qwen3MoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    autoep = hf_to_autoep({L0 + "experts.gate_up_proj": experts.gate_up_proj.data,
                           L0 + "experts.down_proj": experts.down_proj.data})
    x = torch.randn(3, H)
    for e in range(E):
        hf = experts(x, torch.full((3, 1), e), torch.ones(3, 1))
        w1, w2, w3 = (autoep[L0 + f"experts.w{k}"][e] for k in (1, 2, 3))
        ours = (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
        torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)  # a swap of gate and up: O(1)


def test_incomplete_or_misshapen_experts_are_refused():
    state = _autoep()
    del state[L0 + "experts.w3"]
    with pytest.raises(ModelError, match=r"model.layers.0.mlp: AutoEP experts \['w1', 'w2'\]"):
        autoep_to_hf(state)
    state = {**_autoep(), L0 + "experts.w2": torch.zeros(E, I, H)}
    with pytest.raises(ModelError, match="not \\[E, I, H\\], \\[E, I, H\\], \\[E, H, I\\]"):
        autoep_to_hf(state)
    with pytest.raises(ModelError, match="gate_up_proj \\(2, 3, 4\\), down_proj"):
        hf_to_autoep({L0 + "experts.gate_up_proj": torch.zeros(E, I, H), L0 + "experts.down_proj": torch.zeros(E, H, I)})


def test_shapes_across_expert_parallel_sizes():
    """Each of 2 EP ranks holds 2 of 4 experts: w1 [2, I, H] -> gate_up_proj [4, 2I, H]; so EP2 and
    EP4 (1 expert a rank) shapes compare equal in HF terms, and dense shapes pass through."""
    ep2 = {L0 + "router.gate.weight": [4, H], L0 + "experts.w1": [2, I, H], L0 + "experts.w3": [2, I, H],
           L0 + "experts.w2": [2, H, I], "lm_head.weight": [8, H]}
    ep4 = {**ep2, L0 + "experts.w1": [1, I, H], L0 + "experts.w3": [1, I, H], L0 + "experts.w2": [1, H, I]}
    hf = {L0 + "gate.weight": [4, H], L0 + "experts.gate_up_proj": [4, 2 * I, H], L0 + "experts.down_proj": [4, H, I],
          "lm_head.weight": [8, H]}
    assert hf_shapes(ep2, 2) == hf_shapes(ep4, 4) == hf_shapes(hf, 1) == hf
