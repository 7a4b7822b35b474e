"""nll_share: a micro-batch's share of a global mean per-token NLL, checked by hand."""

import pytest
import torch

from megakto.kto import nll_share


def test_all_rows():
    # Two completions, log-probs summed over tokens: -2 and -4; the global batch has 3 tokens.
    # NLL share = (2 + 4) / 3 = 2.
    assert nll_share(torch.tensor([-2.0, -4.0]), 3).item() == 2.0


def test_masked_rows_and_gradient():
    # Only the first row counts: 2 / 4 tokens = 0.5; d/d logps = (-1/4, 0).
    logps = torch.tensor([-2.0, -4.0], requires_grad=True)
    share = nll_share(logps, 4, torch.tensor([True, False]))
    assert share.item() == 0.5
    share.backward()
    assert logps.grad.tolist() == [-0.25, 0.0]


def test_a_masked_out_nan_row_does_not_leak():
    # An undesirable row's non-finite log-prob is not part of the desirable rows' NLL.
    share = nll_share(torch.tensor([-3.0, float("nan")]), 6, torch.tensor([True, False]))
    assert share.item() == 0.5


def test_no_tokens_is_zero_not_nan():
    assert nll_share(torch.tensor([0.0, 0.0]), 0, torch.tensor([False, False])).item() == 0.0


def test_shares_of_micro_batches_add_up_to_the_global_mean():
    # Ranks by slicing: 4 rows with 2, 3, 1, 4 tokens; mean per-token NLL = 10 / 10 tokens = 1.
    logps = torch.tensor([-1.0, -4.0, -2.0, -3.0])
    whole = nll_share(logps, 10)
    parts = nll_share(logps[:2], 10) + nll_share(logps[2:], 10)
    assert whole.item() == parts.item() == 1.0


def test_row_weights_scale_each_rows_nll_share():
    """logps -2, -4, -6 over 10 tokens, weights 1, 0.5, 0: (2 + 2 + 0) / 10 = 0.4; the token count
    stays unweighted."""
    logps = torch.tensor([-2.0, -4.0, -6.0])
    w = torch.tensor([1.0, 0.5, 0.0])
    assert nll_share(logps, 10, weights=w).item() == pytest.approx(0.4)
    assert nll_share(logps, 10, torch.tensor([True, True, False]), w).item() == pytest.approx(0.4)
