"""The training step (:class:`megakto.step.KTOStep`, what ``KTOTrainer.train_step`` runs) against a fake
runner and a fake reference (tests/_step_fakes.py): plan -> no-grad pass -> KL reduce over the
data-parallel group -> eq. (7) loss -> backward -> optimizer step -> metrics, in one process without
DeepSpeed, on numbers worked by hand.

Four rows, one completion token each: row i has prompt [i + 1] and completion [10 + i]; rows 0 and 2
desirable, 1 and 3 undesirable; each row's KL row is its fixed partner's completion (1, 0, 3, 2).
A model's log-prob of a row is its weight of the completion token, so a row's log-ratio is
w_policy[t] − w_ref[t]. beta = 1, λ_D = 2, λ_U = 1 throughout; σ(z) = 1 / (1 + e^−z); a row's
gradient d loss_i / d log π_i is ∓ λ β σ(z)σ(−z) (eq. 7), averaged over the global batch of 4.
"""

import math

import pytest
import torch
from datasets import Dataset

from megakto.data.batcher import Batcher
from megakto.data.split import TokenizedSplit
from megakto.data.step_plan import StepPlanner
from megakto.distributed import comm
from megakto.distributed.parallel import ParallelDims
from megakto.errors import MegaktoError
from megakto.step import KTOStep, LossSettings
from tests._step_fakes import FakeReference, FakeRunner

PAIRS = [([1], [10]), ([2], [11]), ([3], [12]), ([4], [13])]
LABELS = [True, False, True, False]
PARTNERS = [1, 0, 3, 2]
KL_PAIRS = [([1], [11]), ([2], [10]), ([3], [13]), ([4], [12])]
VOCAB = 16
DP = object()  # the data-parallel group: a stand-in object, so that where it goes can be checked


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def slope(z: float) -> float:
    return sig(z) * sig(-z)


def _table(**planted) -> torch.Tensor:
    """A weight per token: 0 except ``w10=0.4``-style entries."""
    w = torch.zeros(VOCAB)
    for name, value in planted.items():
        w[int(name[1:])] = value
    return w


def _step(policy, reference, *, micro=2, kl_scope="step", loss_type="kto", lr=1.0, router=None, router_aux_coef=0.0,
          weights=None):
    """A KTOStep on the four rows: global batch 4 on one data-parallel rank, ``micro`` rows per
    micro-batch (grad accumulation 4 // micro); ``router``: the policy's router table (a
    one-layer mixture of experts, top-1), weighted by ``router_aux_coef``."""
    ds = Dataset.from_dict({"prompt_ids": [p for p, _ in PAIRS], "completion_ids": [c for _, c in PAIRS],
                            "label": LABELS, "prompt_key": [0, 1, 2, 3], **({"weight": weights} if weights else {})})
    dims = ParallelDims(world_size=1, global_batch_size=4, micro_batch_size=micro).with_groups(dp=DP, tp=None, pp=None)
    use_kl = loss_type == "kto"
    planner = StepPlanner(TokenizedSplit(ds), dims.num_micro_batches, dims.grad_accum, use_kl=use_kl,
                          kl_partner=PARTNERS if use_kl else None, seed=0, max_length=16, max_prompt_length=8)
    batcher = Batcher(pad_id=0, packing=True, max_tokens_per_row=16)
    runner = FakeRunner(policy, batcher=batcher, lr=lr, dp_group=dims.dp_group, router=router)
    reference = FakeReference(reference, batcher=batcher) if loss_type != "sft" else None
    loss = LossSettings(loss_type, beta=1.0, desirable_weight=2.0, undesirable_weight=1.0, kl_scope=kl_scope,
                        router_aux_coef=router_aux_coef)
    return KTOStep(planner=planner, runner=runner, reference=reference, dims=dims, loss=loss, device="cpu"), runner


def test_policy_equal_to_reference_gives_half_the_class_weight_per_row():
    """Every log-ratio is 0, so the KL estimate and z_ref are 0 and z = 0 on every row: losses
    λ σ(0) = 1, 0.5, 1, 0.5, mean 0.75. Gradients (σ(0)σ(0) = 1/4, ÷ 4 rows): −2/16 on tokens 10
    and 12 (desirable, pushed up), +1/16 on 11 and 13; norm √(2/64 + 2/256)."""
    w = torch.arange(VOCAB, dtype=torch.float32) * -0.1
    step, runner = _step(w, w)
    result = step(list(range(4)), 0)
    m = result.metrics
    assert result.skipped is None and result.step == 0 and result.indices == [0, 1, 2, 3]
    assert m["loss"] == pytest.approx(0.75, rel=1e-6)
    assert (m["kl"], m["kl/raw"], m["kl/z_ref"], m["kl/clamped"]) == (0.0, 0.0, 0.0, 0.0)
    assert (m["rewards/chosen"], m["rewards/rejected"]) == (0.0, 0.0)
    assert (m["count/chosen"], m["count/rejected"], m["kto/slope/chosen"]) == (2.0, 2.0, 1.0)
    want = _table(w10=-0.125, w11=0.0625, w12=-0.125, w13=0.0625)
    torch.testing.assert_close(runner.grad, want)
    assert m["grad_norm"] == pytest.approx(math.sqrt(2 / 64 + 2 / 256), rel=1e-6)
    assert m["learning_rate"] == 1.0
    torch.testing.assert_close(runner.weights.detach(), w - want)  # one SGD step at lr 1


@pytest.mark.parametrize("micro", [1, 2, 4], ids=["ga4", "ga2", "ga1"])
def test_planted_log_ratios_hand_worked_whatever_the_accumulation(micro):
    """Policy weights 0.4, 0.2, 0, −0.2 on tokens 10-13, reference 0. KL rows take the partners'
    completions 11, 10, 13, 12: log-ratios 0.2, 0.4, −0.2, 0, mean 0.1 = z_ref (positive: not
    clamped). Target log-ratios (rewards) 0.4, 0.2, 0, −0.2, so z − z_ref = 0.3, 0.1, −0.1, −0.3
    and the losses are 2σ(−0.3), σ(0.1), 2σ(0.1), σ(−0.3): mean 3(σ(−0.3) + σ(0.1)) / 4.
    Gradients ÷ 4: −2 slope(0.3), +slope(0.1), −2 slope(0.1), +slope(−0.3) on tokens 10-13. The
    same numbers in 4, 2 or 1 micro-batches: each micro-batch's loss is scaled to its share of
    the global mean."""
    step, runner = _step(_table(w10=0.4, w11=0.2, w13=-0.2), _table(), micro=micro)
    m = step(list(range(4)), 0).metrics
    assert m["loss"] == pytest.approx(3 * (sig(-0.3) + sig(0.1)) / 4, rel=1e-6)
    assert m["kl"] == pytest.approx(0.1, rel=1e-6) and m["kl/raw"] == pytest.approx(0.1, rel=1e-6)
    assert m["kl/z_ref"] == pytest.approx(0.1, rel=1e-6) and m["kl/clamped"] == 0.0
    assert m["rewards/chosen"] == pytest.approx(0.2, rel=1e-6) and m["rewards/rejected"] == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/margins"] == pytest.approx(0.2, rel=1e-6)
    assert m["kl/z_ref_over_reward"] == pytest.approx(0.1 / 0.2, rel=1e-6)  # mean |reward| = 0.8 / 4
    want = torch.tensor([-2 * slope(0.3), slope(0.1), -2 * slope(0.1), slope(-0.3)]) / 4
    torch.testing.assert_close(runner.grad[10:14], want)
    assert runner.grad[:10].abs().sum() == 0 and runner.grad[14:].abs().sum() == 0  # KL rows: no gradient
    assert m["grad_norm"] == pytest.approx(float(want.norm()), rel=1e-6)
    # The runner trained on 4 // micro micro-batches of the planned rows, all four once.
    (batches,) = runner.trained
    assert len(batches) == 4 // micro and {len(b) for b in batches} == {micro}
    assert sorted(p for b in batches for p in b) == PAIRS
    # One no-grad pass each: the policy on the KL rows, the reference on targets + KL rows.
    (kl_batches,) = runner.scored
    assert sorted(p for b in kl_batches for p in b) == KL_PAIRS


@pytest.mark.parametrize("micro", [1, 4], ids=["ga4", "ga1"])
def test_row_weights_scale_their_rows_terms_and_leave_z_ref_alone(micro):
    """The planted log-ratios above with row weights 2, 0, 1, 0.5. z_ref is unweighted: 0.1 as
    before. Losses 2·2σ(−0.3), 0·σ(0.1), 1·2σ(0.1), 0.5·σ(−0.3), mean (4.5σ(−0.3) + 2σ(0.1)) / 4;
    each row's gradient is its weight times the unweighted one (row 1, weight 0: none on token 11).
    ``count/*`` stay row counts; ``weight/*`` sum the weights per class."""
    step, runner = _step(_table(w10=0.4, w11=0.2, w13=-0.2), _table(), micro=micro, weights=[2.0, 0.0, 1.0, 0.5])
    m = step(list(range(4)), 0).metrics
    assert m["kl"] == pytest.approx(0.1, rel=1e-6)
    assert m["loss"] == pytest.approx((4.5 * sig(-0.3) + 2 * sig(0.1)) / 4, rel=1e-6)
    want = torch.tensor([-4 * slope(0.3), 0.0, -2 * slope(0.1), 0.5 * slope(-0.3)]) / 4
    torch.testing.assert_close(runner.grad[10:14], want)
    assert runner.grad[11] == 0
    assert (m["count/chosen"], m["count/rejected"]) == (2.0, 2.0)
    assert (m["weight/chosen"], m["weight/rejected"], m["weight/zero"]) == (3.0, 0.5, 1.0)


def test_weights_of_one_give_the_unweighted_step_bit_for_bit():
    plain, runner_a = _step(_table(w10=0.4, w11=0.2, w13=-0.2), _table())
    ones, runner_b = _step(_table(w10=0.4, w11=0.2, w13=-0.2), _table(), weights=[1.0] * 4)
    a, b = plain(list(range(4)), 0).metrics, ones(list(range(4)), 0).metrics
    assert torch.equal(runner_a.grad, runner_b.grad)
    assert {k: v for k, v in b.items() if not k.startswith(("weight/", "tokens_per_s", "samples_per_s"))} == {
        k: v for k, v in a.items() if not k.startswith(("tokens_per_s", "samples_per_s"))}


def test_kl_is_reduced_once_over_the_data_parallel_group(monkeypatch):
    """Two collectives per step, both over the step's data-parallel group (here of size 1, a
    no-op): the KL estimate's (sum, count) = (0.4, 4), then the metric sums."""
    calls, original = [], comm.all_reduce_sum

    def recording(tensor, *, group):
        calls.append((group, tensor.clone()))
        return original(tensor, group=group)

    monkeypatch.setattr(comm, "all_reduce_sum", recording)
    step, _ = _step(_table(w10=0.4, w11=0.2, w13=-0.2), _table(), micro=2)
    step(list(range(4)), 0)
    assert [group is DP for group, _ in calls] == [True, True]
    torch.testing.assert_close(calls[0][1], torch.tensor([0.4, 4.0], dtype=torch.float64))


def test_microbatch_kl_scope_gives_each_micro_batch_its_own_reference_point():
    """``kto.kl_scope: microbatch`` with 2 micro-batches. All rows are 4 tokens long (target +
    KL row), so the plan puts rows {0, 1} and {2, 3} together (one of each class per micro-batch).
    KL means: (0.2 + 0.4) / 2 = 0.3 and (−0.2 + 0) / 2 = −0.1, clamped to 0. z − z_ref: 0.1, −0.1
    in the first, 0, −0.2 in the second: losses 2σ(−0.1), σ(−0.1), 2σ(0), σ(−0.2). Logged: kl
    (clamped) mean 0.15, kl/raw mean 0.1, half the estimates clamped."""
    step, runner = _step(_table(w10=0.4, w11=0.2, w13=-0.2), _table(), micro=2, kl_scope="microbatch")
    m = step(list(range(4)), 0).metrics
    assert runner.trained == [[PAIRS[:2], PAIRS[2:]]]
    assert m["loss"] == pytest.approx((3 * sig(-0.1) + 1 + sig(-0.2)) / 4, rel=1e-6)
    assert m["kl"] == pytest.approx(0.15, rel=1e-6) and m["kl/raw"] == pytest.approx(0.1, rel=1e-6)
    assert m["kl/clamped"] == 0.5 and m["kl/z_ref"] == pytest.approx(0.15, rel=1e-6)


def test_a_non_finite_reference_point_skips_the_step_before_the_policy_pass():
    """A NaN reference log-prob on token 11 (row 1's target and row 0's KL row) makes z_ref NaN:
    the runner is told the step is skipped, nothing is back-propagated, the weights stay."""
    w = _table(w10=0.4)
    step, runner = _step(w, _table(w11=float("nan")))
    result = step(list(range(4)), 0)
    assert result.skipped == "non-finite KL reference point z_ref"
    assert math.isnan(result.metrics["loss"]) and math.isnan(result.metrics["kl"])
    assert "grad_norm" not in result.metrics and result.metrics["learning_rate"] == 1.0
    assert runner.grad is None and torch.equal(runner.weights.detach(), w)


def test_the_previous_steps_kl_estimate_gives_its_change():
    """lr 0: the weights stay, so the second step's estimate equals the first (0.1): change 0."""
    step, _ = _step(_table(w10=0.4, w11=0.2, w13=-0.2), _table(), lr=0.0)
    first = step(list(range(4)), 0).metrics
    second = step(list(range(4)), 1).metrics
    assert "kl/raw_change" not in first and second["kl/raw_change"] == pytest.approx(0.0, abs=1e-9)


def test_sft_is_the_mean_token_nll_without_a_reference():
    """``loss_type: sft``: no reference, no KL rows; the loss is the mean NLL per completion token,
    −(−1 − 2 − 3 − 4) / 4 = 2.5, and each token's gradient is −1/4."""
    step, runner = _step(_table(w10=-1.0, w11=-2.0, w12=-3.0, w13=-4.0), None, loss_type="sft")
    m = step(list(range(4)), 0).metrics
    assert m["loss"] == pytest.approx(2.5, rel=1e-6) and m["kl"] == 0.0
    assert runner.scored == []  # no KL rows to score
    torch.testing.assert_close(runner.grad, _table(w10=-0.25, w11=-0.25, w12=-0.25, w13=-0.25))


def _router(**to_expert_1) -> torch.Tensor:
    """Two experts; every token's router logits are (ln 3, 0): probabilities (3/4, 1/4), top-1 expert
    0; tokens named ``t11=True`` get (0, ln 3): (1/4, 3/4), expert 1."""
    table = torch.tensor([[math.log(3.0), 0.0]]).repeat(VOCAB, 1)
    for name in to_expert_1:
        table[int(name[1:])] = torch.tensor([0.0, math.log(3.0)])
    return table


@pytest.mark.parametrize("micro", [2, 4], ids=["ga2", "ga1"])
def test_router_balancing_loss_joins_the_loss_once_per_micro_batch(micro):
    """A one-layer MoE policy (2 experts, top-1), kto.router_aux_coef 0.1, policy = reference (every
    row's KTO loss λ σ(0): 1, 0.5, 1, 0.5). Tokens 11 and 13 (the undesirable completions) route to
    expert 1, the six others to expert 0. One micro-batch of all 4 rows, or two of rows {0, 1} and
    {2, 3}: each forward has f = (3/4, 1/4), P = (5/8, 3/8), aux = 2 (3/4 · 5/8 + 1/4 · 3/8) = 1.125.
    Each micro-batch's loss adds 0.1 · 1.125 · its rows: 3 + 0.45 = 3.45 (one micro-batch) or
    1.5 + 0.225 = 1.725 (each of two). The router gradient is the same either way: per token
    0.1 · (1/M) · (2 / T_m) · (f_0 p_0 p_1 − f_1 p_1 p_0) = 0.1 · (2/8) · 0.09375 = 2.34375e-3 on the
    logit of expert 0 and its negative on expert 1, for M micro-batches of T_m = 8/M tokens each.
    The policy's own gradient and the logged KTO loss are those without the router."""
    w = torch.arange(VOCAB, dtype=torch.float32) * -0.1
    step, runner = _step(w, w, micro=micro, router=_router(t11=True, t13=True), router_aux_coef=0.1)
    m = step(list(range(4)), 0).metrics
    assert runner.losses == pytest.approx([3.45] if micro == 4 else [1.725, 1.725], abs=1e-6)
    assert m["loss"] == pytest.approx(0.75, rel=1e-6)
    assert m["router/aux_loss"] == pytest.approx(1.125, abs=1e-6)
    assert (m["router/layer0/load_min"], m["router/layer0/load_max"]) == (0.25, 0.75)
    assert (m["router/load_min"], m["router/load_max"]) == (0.25, 0.75)
    used = [1, 2, 3, 4, 10, 11, 12, 13]
    want = torch.zeros(VOCAB, 2)
    want[used] = torch.tensor([2.34375e-3, -2.34375e-3])
    torch.testing.assert_close(runner.router_grad, want, rtol=0, atol=1e-8)
    torch.testing.assert_close(runner.grad, _table(w10=-0.125, w11=0.0625, w12=-0.125, w13=0.0625))


def test_router_balancing_loss_is_the_mean_over_the_steps_forwards():
    """One row per micro-batch (4 forwards of 2 tokens): rows 0 and 2 send both tokens to expert 0
    (f = (1, 0), P = (3/4, 1/4): aux = 2 · 3/4 = 1.5), rows 1 and 3 one to each (f = (1/2, 1/2),
    P = (1/2, 1/2): aux = 1). router/aux_loss is their mean, 1.25; the loads pool the step's tokens."""
    w = torch.zeros(VOCAB)
    step, _ = _step(w, w, micro=1, router=_router(t11=True, t13=True), router_aux_coef=0.1)
    m = step(list(range(4)), 0).metrics
    assert m["router/aux_loss"] == pytest.approx(1.25, abs=1e-6)
    assert (m["router/load_min"], m["router/load_max"]) == (0.25, 0.75)


def test_a_router_coefficient_without_router_logits_is_refused():
    w = torch.zeros(VOCAB)
    step, _ = _step(w, w, router_aux_coef=0.1)  # a dense fake: its policy pass gives no router logits
    with pytest.raises(MegaktoError) as info:
        step(list(range(4)), 0)
    assert str(info.value) == ("kto.router_aux_coef=0.1, but this mode's policy pass gave no router logits; set "
                               "kto.router_aux_coef=0")
