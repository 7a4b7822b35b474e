"""The router's balancing loss end to end: a tiny Qwen3-MoE (one MoE layer, 4 experts, top-2) whose
router starts skewed, trained for a few steps on 2 ranks under ZeRO-3 with kto.router_aux_coef=1
and with 0. With the loss on, the logged per-expert shares spread step by step and the trained
router spreads the same probe rows' tokens over the experts; with it off, no router metric is
logged (the forwards ask for no router logits) and the router stays as skewed. The same steps on
one rank with gradient accumulation give the same aux, loads and weights, and so do they with the
experts split over the 2 ranks (expert parallelism)."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megakto._demo.data import write_demo_data
from megakto._demo.tiny_model import make_tiny_model
from megakto.data.packing import pack
from megakto.model.forward import packed_completion_logps
from megakto.model.router import micro_batch_balance
from tests.e2e.conftest import run_trainer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

STEPS = 5


def skewed_moe(folder) -> str:
    """Dimension 0 of every token embedding is 0.1, five times the init's spread, so it stands out
    after the router's RMS norm; the router weighs it (0.4, 0.3, −0.3, −0.4) over otherwise random
    weights (std 0.3): most tokens pick experts 0 and 1, fewer pick 2 and 3."""
    path = make_tiny_model(folder, family="qwen3_moe", num_layers=1, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1
        gate = model.model.layers[0].mlp.gate.weight
        gate.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        gate[:, 0] = torch.tensor([0.4, 0.3, -0.3, -0.4])
    model.save_pretrained(path)
    return str(path)


def loads(path: str, state: dict | None, pairs) -> list[float]:
    """Each expert's share of the probe rows' tokens under the model at ``path`` (with ``state``'s weights)."""
    model = AutoModelForCausalLM.from_pretrained(path)
    if state is not None:
        model.load_state_dict(state)
    batch, logits = pack(pairs, 256, 0), []
    with torch.no_grad():
        packed_completion_logps(model, batch, attn="sdpa", router_logits=logits)
        balance = micro_batch_balance(logits, batch, 2)
    return (balance.counts[0] / balance.tokens).tolist()


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    root = tmp_path_factory.mktemp("router_aux")
    train, _ = write_demo_data(root / "data", n_train_prompts=40, n_eval_prompts=4, seed=0)
    return root, {"model": skewed_moe(root / "model"), "train": str(train)}


def _train(skewed, coef: float, nproc: int, **extra):
    root, assets = skewed
    out = root / f"coef{coef}_dp{nproc}{''.join(f'_{k}{v}' for k, v in extra.items())}"
    _, result = run_trainer(assets, out, nproc=nproc, **{"kto.router_aux_coef": coef, "train.max_steps": STEPS,
                                                         "train.global_batch_size": 8, "optim.lr": 3e-4, **extra})
    return out, result["history"], torch.load(os.path.join(out, "dump", "policy.pt"), weights_only=True)


@pytest.fixture(scope="module")
def balanced(skewed):
    """kto.router_aux_coef=1 on 2 ranks: one micro-batch of 4 rows per rank and step."""
    return _train(skewed, 1, 2)


def test_balancing_spreads_the_load_that_coefficient_zero_leaves(skewed, balanced):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, assets = skewed
    out, on, on_weights = balanced
    _, off, off_weights = _train(skewed, 0, 2)
    assert not any(k.startswith("router/") for h in off for k in h)
    assert all({"router/aux_loss", "router/load_min", "router/load_max", "router/layer0/load_min",
                "router/layer0/load_max"} <= set(h) for h in on)
    assert on[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # eq. (7) alone, the aux apart
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in events.Scalars("router/load_max")]
    assert logged == pytest.approx([h["router/load_max"] for h in on])  # TensorBoard holds the same shares
    spread = [h["router/load_max"] - h["router/load_min"] for h in on]
    aux = [h["router/aux_loss"] for h in on]
    assert spread[0] > 0.6 and spread[-1] < spread[0] - 0.2, spread
    least = [h["router/layer0/load_min"] for h in on]  # the least-used expert's share rises
    assert least[-1] > least[0] + 0.05, least
    assert aux[-1] < aux[0] - 0.3, aux
    # The trained routers on the same probe rows: the balanced run's spreads, the other's does not.
    tok = AutoTokenizer.from_pretrained(assets["model"])
    with open(assets["train"]) as f:
        rows = [json.loads(line) for line in f][:32]
    pairs = [(tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"]) for r in rows]
    before, after_off, after_on = (loads(assets["model"], state, pairs) for state in (None, off_weights, on_weights))
    width = {name: max(v) - min(v) for name, v in (("before", before), ("off", after_off), ("on", after_on))}
    assert abs(width["off"] - width["before"]) < 0.1, width
    assert width["on"] < width["before"] - 0.2, width


def test_the_balancing_loss_is_invariant_to_data_parallel_size(skewed, balanced):
    """The same 2 micro-batches per step on one rank (gradient accumulation 2) as on two (1 each):
    each micro-batch's aux is the same, and each enters the update once, weighted 1/2 either way:
    the same logged aux and loads, and the same weights to the DP-invariance tolerance of
    tests/e2e/test_invariance.py."""
    _, two, two_weights = balanced
    _, one, one_weights = _train(skewed, 1, 1)
    for a, b in zip(one, two):
        for key in ("loss", "router/aux_loss", "router/load_min", "router/load_max"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    for name in one_weights:
        torch.testing.assert_close(one_weights[name], two_weights[name], rtol=1e-5, atol=5e-6, msg=name)
    gate = "model.layers.0.mlp.gate.weight"
    assert (one_weights[gate] - two_weights[gate]).abs().max() < 5e-6


def test_balancing_spreads_the_load_alike_under_expert_parallelism(skewed, balanced):
    """The balanced run with each MoE layer's 4 experts split over the 2 ranks (parallel.ep_size=2,
    AutoEP): the same logged aux and per-expert shares every step, and the same weights, router
    included, to the DP-invariance tolerance."""
    _, zero3, zero3_weights = balanced
    _, ep, ep_weights = _train(skewed, 1, 2, **{"parallel.ep_size": 2})
    for a, b in zip(zero3, ep):
        for key in ("loss", "router/aux_loss", "router/layer0/load_min", "router/layer0/load_max"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert ep[-1]["router/layer0/load_min"] > ep[0]["router/layer0/load_min"] + 0.05
    assert set(ep_weights) == set(zero3_weights)
    for name in zero3_weights:
        torch.testing.assert_close(ep_weights[name], zero3_weights[name], rtol=1e-5, atol=5e-6, msg=name)
