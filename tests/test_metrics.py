"""megakto.metrics: per-rank sums of two hand-worked micro-batches, their combine across ranks by
slicing, and the metrics divided out of them (KTO, KTO + SFT term, SFT baseline).

Micro-batch A (3 rows: chosen, rejected, chosen) and B (2 rows, both rejected):

    row      A0     A1      A2     B0      B1
    loss     0.5    1.0     0.25   0.75    0.5
    reward   0.25  -0.125   0.5   -0.375   0.125
    slope    1.0    0.5     0.25   0.75    0.5    (4 sigmoid(z) sigmoid(-z) of each row)
    logp    -3.0   -5.0    -1.5   -2.0    -4.0
    tokens   3      5       2      4       1      (completion tokens; 16 + 8 tokens in the batches)

Sums over A and B: loss 3.0, rows 5; rewards chosen 0.25 + 0.5 = 0.75, rejected
-0.125 - 0.375 + 0.125 = -0.375; logps chosen -4.5, rejected -11.0; counts 2 and 3; completion
tokens 15, of chosen rows 5; all tokens 24; NLL of chosen rows 4.5, of all rows 15.5; one micro-batch
(B) of a single class; |rewards| 1.375; slopes of chosen rows 1.25, of rejected rows 1.75. Every value is a dyadic fraction, so the float32 sums are exact.
"""

import math

import pytest
import torch

from megakto.kto import RouterBalance
from megakto.metrics import StepSums, reference_point_metrics, step_metrics, weight_metrics

A = dict(losses=[0.5, 1.0, 0.25], rewards=[0.25, -0.125, 0.5], logps=[-3.0, -5.0, -1.5],
         desirable=[True, False, True], n_tokens=[3, 5, 2], tokens=16, slopes=[1.0, 0.5, 0.25])
B = dict(losses=[0.75, 0.5], rewards=[-0.375, 0.125], logps=[-2.0, -4.0],
         desirable=[False, False], n_tokens=[4, 1], tokens=8, slopes=[0.75, 0.5])

WHOLE = {"loss": 3.0, "rows": 5, "rewards_chosen": 0.75, "rewards_rejected": -0.375,
         "logps_chosen": -4.5, "logps_rejected": -11.0, "count_chosen": 2, "count_rejected": 3,
         "target_tokens": 15, "desirable_tokens": 5, "tokens": 24, "nll_chosen": 4.5, "nll": 15.5,
         "single_class": 1, "abs_rewards": 1.375, "slopes_chosen": 1.25, "slopes_rejected": 1.75}


def _tensors(mb):
    return dict(losses=torch.tensor(mb["losses"]), rewards=torch.tensor(mb["rewards"]),
                logps=torch.tensor(mb["logps"]), desirable=torch.tensor(mb["desirable"]),
                n_tokens=torch.tensor(mb["n_tokens"]), tokens=mb["tokens"], slopes=torch.tensor(mb["slopes"]))


def sums(*micro_batches):
    s = StepSums()
    for mb in micro_batches:
        s.add(**_tensors(mb))
    return s.values


def test_sums_of_two_micro_batches():
    assert sums(A, B) == WHOLE
    assert sums() == {k: 0.0 for k in WHOLE}


def test_inputs_that_carry_a_graph_or_bf16_are_summed_as_float():
    """Losses and log-probs arrive with a graph (logps in the model's dtype); rewards arrive detached."""
    mb = _tensors(A)
    mb["losses"].requires_grad_()
    mb["logps"] = mb["logps"].to(torch.bfloat16).requires_grad_()  # these values are exact in bf16
    s = StepSums()
    s.add(**mb)
    assert s.values == sums(A)


def test_ranks_by_slicing_sum_to_the_whole():
    """Rank 0 holds A, rank 1 holds B; the trainer's all-reduce adds their sums key by key."""
    rank0, rank1 = sums(A), sums(B)
    combined = {k: rank0[k] + rank1[k] for k in rank0}
    assert combined == sums(A, B) == WHOLE
    # The same rows in one micro-batch give the same sums.
    one = {k: A[k] + B[k] for k in ("losses", "rewards", "logps", "desirable", "n_tokens", "slopes")}
    assert sums({**one, "tokens": 24}) == {**WHOLE, "single_class": 0}  # one micro-batch of both classes
    kw = dict(kl=0.125, elapsed=2.0, loss_type="sigmoid", sft_weight=0.0)
    assert step_metrics(combined, **kw) == step_metrics(WHOLE, **kw)
    # A mean of the ranks' means would be wrong: (1.75/3 + 1.25/2) / 2 = 0.6041... != 3/5.
    assert step_metrics(combined, **kw)["loss"] == 0.6
    assert (rank0["loss"] / rank0["rows"] + rank1["loss"] / rank1["rows"]) / 2 == pytest.approx(0.60416666)


def test_kto_metrics():
    m = step_metrics(WHOLE, kl=0.125, elapsed=2.0, loss_type="sigmoid", sft_weight=0.0)
    assert m == {
        "kl": 0.125, "count/chosen": 2, "count/rejected": 3, "count/single_class_micro_batches": 1,
        "tokens_per_s": 7.5,  # 15 completion tokens / 2 s
        "samples_per_s": 2.5,  # 5 rows / 2 s
        "loss": 0.6,  # 3.0 / 5 rows
        "rewards/chosen": 0.375,  # 0.75 / 2
        "rewards/rejected": -0.125,  # -0.375 / 3
        "logps/chosen": -2.25,  # -4.5 / 2
        "logps/rejected": -11.0 / 3,
        "rewards/margins": 0.5,  # 0.375 - (-0.125)
        "kto/slope/chosen": 0.625,  # 1.25 / 2
        "kto/slope/rejected": 1.75 / 3,
    }


def test_sft_weight_adds_the_chosen_rows_per_token_nll():
    m = step_metrics(WHOLE, kl=0.125, elapsed=2.0, loss_type="sigmoid", sft_weight=0.5)
    assert m["sft_nll"] == 0.9  # 4.5 NLL / 5 chosen-row tokens
    assert m["loss"] == pytest.approx(1.05, abs=1e-15)  # 0.6 + 0.5 * 0.9
    assert m["rewards/margins"] == 0.5


def test_sft_baseline_loss_is_the_per_token_nll_of_every_completion():
    m = step_metrics(WHOLE, kl=0.0, elapsed=0.5, loss_type="sft", sft_weight=0.0)
    assert m == {"kl": 0.0, "count/chosen": 2, "count/rejected": 3, "count/single_class_micro_batches": 1,
                 "tokens_per_s": 30.0,
                 "samples_per_s": 10.0, "loss": 15.5 / 15}


def test_a_missing_class_gives_nan_means_and_no_margin():
    rejected_only = sums(B)
    m = step_metrics(rejected_only, kl=0.0, elapsed=1.0, loss_type="sigmoid", sft_weight=0.5)
    assert math.isnan(m["rewards/chosen"]) and math.isnan(m["logps/chosen"])
    assert m["rewards/rejected"] == -0.125 and m["logps/rejected"] == -3.0  # -0.25 / 2, -6 / 2
    assert "rewards/margins" not in m
    assert m["kto/slope/rejected"] == 0.625 and "kto/slope/chosen" not in m  # (0.75 + 0.5) / 2
    assert m["sft_nll"] == 0.0  # no chosen tokens: 0 / max(0, 1)
    assert m["loss"] == 0.625  # 1.25 / 2 rows, plus 0.5 * 0
    chosen_only = sums({k: [v[0], v[2]] if isinstance(v, list) else v for k, v in A.items()})
    m = step_metrics(chosen_only, kl=0.0, elapsed=1.0, loss_type="sigmoid", sft_weight=0.0)
    assert math.isnan(m["rewards/rejected"]) and math.isnan(m["logps/rejected"])
    assert m["rewards/chosen"] == 0.375 and "rewards/margins" not in m


def test_sft_rows_have_no_slopes():
    """An SFT micro-batch has no sigmoid: its slopes are None and add nothing."""
    mb = _tensors(A)
    mb["slopes"] = None
    s = StepSums()
    s.add(**mb)
    assert s.values["slopes_chosen"] == s.values["slopes_rejected"] == 0.0
    assert s.values["abs_rewards"] == 0.875  # 0.25 + 0.125 + 0.5


def test_reference_point_metrics_at_step_scope():
    """One estimate of 2.5 nats at beta 0.1: z_ref 0.25 against rewards of mean size 1.0."""
    m = reference_point_metrics([2.5], beta=0.1, mean_abs_reward=1.0, previous_raw=3.0)
    assert m == pytest.approx({"kl/raw": 2.5, "kl/clamped": 0.0, "kl/z_ref": 0.25,
                               "kl/z_ref_over_reward": 0.25, "kl/raw_change": 0.5}, abs=1e-15)


def test_reference_point_metrics_clamped_and_per_micro_batch():
    """kl_scope=microbatch, four micro-batches: -2 and -0.5 are clamped to 0, so z_ref is
    0.5 * (0 + 0 + 1 + 3) / 4 = 0.5 while the raw mean is (-2 - 0.5 + 1 + 3) / 4 = 0.375."""
    m = reference_point_metrics([-2.0, -0.5, 1.0, 3.0], beta=0.5, mean_abs_reward=2.0, previous_raw=None)
    assert m == {"kl/raw": 0.375, "kl/clamped": 0.5, "kl/z_ref": 0.5, "kl/z_ref_over_reward": 0.25}
    # No rows with a reward (all exactly 0, the first step from the reference): no ratio.
    m = reference_point_metrics([-1.0], beta=0.1, mean_abs_reward=0.0, previous_raw=-3.0)
    assert m == {"kl/raw": -1.0, "kl/clamped": 1.0, "kl/z_ref": 0.0, "kl/raw_change": 2.0}


def _balance(aux, counts, tokens):
    return RouterBalance(torch.tensor(aux), torch.tensor(counts, dtype=torch.float64), torch.tensor(float(tokens)))


def test_router_sums_reduce_by_name_and_divide_into_loads():
    """Two forwards of a 2-layer, 3-expert, top-2 router. Rank 0's: aux 2.5, 4 tokens, layer 0 counts
    (4, 3, 1), layer 1 (2, 2, 4); rank 1's: aux 2.0, 2 tokens, (0, 2, 2) and (2, 1, 1). Summed: aux
    4.5 over 2 forwards (router/aux_loss 2.25), 6 tokens, counts (4, 5, 3) and (4, 3, 5): loads
    (4/6, 5/6, 3/6) and (4/6, 3/6, 5/6), so each layer's min 0.5 and max 5/6 (shares of the tokens,
    summing to k = 2). A mean of the ranks' own loads would give layer 0 min (1/4 + 0) / 2 instead."""
    first, second = StepSums(), StepSums()
    first.add(**_tensors(A))
    first.add_router(_balance(2.5, [[4, 3, 1], [2, 2, 4]], 4))
    second.add(**_tensors(B))
    second.add_router(_balance(2.0, [[0, 2, 2], [2, 1, 1]], 2))
    rank0, rank1 = first.values, second.values
    assert sorted(rank0) == sorted(rank1)  # the same names on every rank: all_reduce_dict sums them by name
    combined = {k: rank0[k] + rank1[k] for k in rank0}
    m = step_metrics(combined, kl=0.0, elapsed=1.0, loss_type="kto", sft_weight=0.0)
    assert m["router/aux_loss"] == 2.25
    assert (m["router/layer0/load_min"], m["router/layer0/load_max"]) == (0.5, 5 / 6)
    assert (m["router/layer1/load_min"], m["router/layer1/load_max"]) == (0.5, 5 / 6)
    assert (m["router/load_min"], m["router/load_max"]) == (0.5, 5 / 6)
    assert m["loss"] == step_metrics(sums(A, B), kl=0.0, elapsed=1.0, loss_type="kto", sft_weight=0.0)["loss"]
    assert not any(k.startswith("router") for k in step_metrics(sums(A, B), kl=0.0, elapsed=1.0, loss_type="kto",
                                                                 sft_weight=0.0))


def test_weight_metrics_sum_each_class_and_count_zero_weights():
    """Labels D, U, D, U with weights 0.5, 2, 0, 1.25: chosen 0.5 + 0 = 0.5, rejected 3.25, one zero."""
    assert weight_metrics([True, False, True, False], [0.5, 2.0, 0.0, 1.25]) == {
        "weight/chosen": 0.5, "weight/rejected": 3.25, "weight/zero": 1.0}
