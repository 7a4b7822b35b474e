"""kl_partial / finalize_kl: ranks by slicing, and why a mean of per-rank means is wrong."""

import pytest
import torch

from megakto.kto import finalize_kl, kl_partial, raw_kl


def _combine(parts):
    """What the trainer's all-reduce(SUM) does to the (sum, count) pairs of every rank."""
    sums, counts = zip(*parts)
    return torch.stack(sums).sum(), torch.stack(counts).sum()


def _parts(policy, ref, sizes):
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [kl_partial(policy[a:b], ref[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize(
    "sizes",
    [[23], [10, 13], [1, 22], [0, 23], [5, 0, 18], [7, 1, 0, 15], [0, 0, 3, 20], [11, 12, 0, 0]],
)
@pytest.mark.parametrize("shift", [0.5, -0.5])
def test_ranks_by_slicing_equal_whole_batch(sizes, shift):
    """Split 23 mismatched pairs unevenly over 1-4 ranks (some empty): combining the (sum, count)
    pairs gives exactly clamp(mean over all 23, 0), whatever the split."""
    gen = torch.Generator().manual_seed(len(sizes) * 7 + sizes[0])
    ref = -40 * torch.rand(23, generator=gen, dtype=torch.float64)
    policy = ref + shift + torch.randn(23, generator=gen, dtype=torch.float64)
    kl = finalize_kl(*_combine(_parts(policy, ref, sizes)))
    whole = finalize_kl(*kl_partial(policy, ref))
    expected = (policy - ref).mean().clamp_min(0).float()
    torch.testing.assert_close(kl, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(kl, whole, rtol=1e-6, atol=0)
    if shift > 0:
        assert kl > 0  # the positive case really exercises the division, not just the clamp


def test_mean_of_rank_means_is_biased_with_uneven_counts():
    """Rank 0 holds one pair with log-ratio 4; rank 1 holds three pairs with log-ratio 0.

    (sum, count):       (4 + 0 + 0 + 0) / (1 + 3) = 1.0
    mean of rank means: (4/1 + 0/3) / 2           = 2.0   (TRL, LLaMA-Factory)  -> off by 1.0
    """
    ref = torch.zeros(4, dtype=torch.float64)
    policy = torch.tensor([4.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    parts = _parts(policy, ref, [1, 3])
    ours = finalize_kl(*_combine(parts)).item()
    rank_means = torch.stack([s / c for s, c in parts]).mean().clamp_min(0).item()
    assert ours == 1.0
    assert rank_means == 2.0
    assert rank_means - ours == pytest.approx(1.0)


def test_clamp_then_average_is_biased_upward():
    """Rank 0: one pair at +3; rank 1: three pairs at -1.

    (sum, count):               max(0, (3 - 3) / 4)          = 0.0
    clamp each, then average:   (max(0, 3) + max(0, -1)) / 2 = 1.5   (NeMo-Aligner)
    """
    ref = torch.zeros(4, dtype=torch.float64)
    policy = torch.tensor([3.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    parts = _parts(policy, ref, [1, 3])
    ours = finalize_kl(*_combine(parts)).item()
    nemo = sum(finalize_kl(s, c).item() for s, c in parts) / 2
    assert ours == 0.0
    assert nemo == 1.5


def test_partial_values_and_dtypes():
    """policy - ref = [0.5, -0.25, 2.0] -> sum 2.25, count 3, kl = 0.75."""
    policy = torch.tensor([-1.0, -3.25, 0.0], requires_grad=True)
    ref = torch.tensor([-1.5, -3.0, -2.0])
    total, count = kl_partial(policy, ref)
    assert total.dtype == count.dtype == torch.float64
    assert total.dim() == count.dim() == 0
    assert not total.requires_grad
    assert (total.item(), count.item()) == (2.25, 3.0)
    kl = finalize_kl(total, count)
    assert kl.dtype == torch.float32 and kl.dim() == 0 and not kl.requires_grad
    assert kl.item() == 0.75


def test_negative_mean_clamps_to_zero():
    """policy - ref = [-1, -2] -> mean -1.5 -> max(0, -1.5) = 0."""
    total, count = kl_partial(torch.tensor([-2.0, -4.0]), torch.tensor([-1.0, -2.0]))
    assert (total.item(), count.item()) == (-3.0, 2.0)
    assert finalize_kl(total, count).item() == 0.0
    # Before the clamp (logged as kl/raw): the mean itself, in float64.
    raw = raw_kl(total, count)
    assert raw.item() == -1.5 and raw.dtype == torch.float64
    assert raw_kl(0.0, 0.0).item() == 0.0 and raw_kl(6.0, 4.0).item() == 1.5


def test_zero_count_gives_zero_not_nan():
    total, count = kl_partial(torch.zeros(0), torch.zeros(0))
    assert (total.item(), count.item()) == (0.0, 0.0)
    kl = finalize_kl(total, count)
    assert kl.item() == 0.0 and not torch.isnan(kl)
    # Python numbers, as a caller might pass after a manual reduction, work too.
    assert finalize_kl(0.0, 0.0).item() == 0.0
    assert finalize_kl(6.0, 4.0).item() == 1.5


def test_sum_is_accumulated_in_float64():
    """float32 log-ratios [2**24, 1, -2**24]: in float32, 2**24 + 1 rounds back to 2**24 and the
    sum is 0; kl_partial upcasts first, so the sum is 1 and the kl is 1/3."""
    policy = torch.tensor([2.0**24, 1.0, -(2.0**24)])
    assert policy.sum().item() == 0.0  # the float32 failure this guards against
    total, count = kl_partial(policy, torch.zeros(3))
    assert total.item() == 1.0
    assert finalize_kl(total, count).item() == pytest.approx(1 / 3)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        kl_partial(torch.zeros(3), torch.zeros(4))
