"""kto_loss: hand-worked values, Proposition 4.1 gradients, and edge batches."""

import math

import pytest
import torch

from megakto.kto import KTOLossOutput, kto_loss

# sigma(-2), sigma(-1), sigma(0), sigma(1), sigma(2)
SIG = {-2: 0.11920292202, -1: 0.26894142137, 0: 0.5, 1: 0.73105858863, 2: 0.88079707798}
LOGRATIOS = [2.0, 1.0, 0.0, -1.0, -2.0]


def _run(logratios, desirable, kl=0.0, **kw):
    ref = torch.tensor([-10.0, -20.0, -30.0, -40.0, -50.0][: len(logratios)], dtype=torch.float64)
    policy = ref + torch.tensor(logratios, dtype=torch.float64)
    return kto_loss(
        policy, ref, torch.tensor(desirable), torch.tensor(kl, dtype=torch.float64), **kw
    )


def test_desirable_hand_values():
    """beta=1, kl=0: loss = 1 - sigma(r) = sigma(-r).

    r = +2, +1, 0, -1, -2  ->  sigma(-2), sigma(-1), sigma(0), sigma(1), sigma(2)
                            =  0.1192,    0.2689,    0.5,      0.7311,   0.8808
    """
    out = _run(LOGRATIOS, [True] * 5, beta=1.0)
    assert isinstance(out, KTOLossOutput)
    torch.testing.assert_close(
        out.losses, torch.tensor([0.1192, 0.2689, 0.5, 0.7311, 0.8808], dtype=torch.float64),
        atol=1e-4, rtol=0,
    )


def test_undesirable_hand_values_mirror():
    """beta=1, kl=0: loss = 1 - sigma(kl - r) = sigma(r): r = +2 .. -2 -> 0.8808 .. 0.1192."""
    out = _run(LOGRATIOS, [False] * 5, beta=1.0)
    torch.testing.assert_close(
        out.losses, torch.tensor([0.8808, 0.7311, 0.5, 0.2689, 0.1192], dtype=torch.float64),
        atol=1e-4, rtol=0,
    )


def test_mixed_batch_and_weights():
    """lambda_D=2, lambda_U=0.5, beta=1, kl=0, labels D,U,D,U,D.

    r=+2 D: 2 * sigma(-2) = 0.2384     r=+1 U: 0.5 * sigma(1) = 0.3655
    r= 0 D: 2 * 0.5       = 1.0        r=-1 U: 0.5 * sigma(-1) = 0.1345
    r=-2 D: 2 * sigma(2)  = 1.7616
    """
    out = _run(
        LOGRATIOS, [True, False, True, False, True], beta=1.0,
        desirable_weight=2.0, undesirable_weight=0.5,
    )
    expected = [2 * SIG[-2], 0.5 * SIG[1], 1.0, 0.5 * SIG[-1], 2 * SIG[2]]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    assert [round(x, 4) for x in expected] == [0.2384, 0.3655, 1.0, 0.1345, 1.7616]


def test_kl_shifts_the_threshold():
    """beta=1, kl=1: z = r - 1. r=1 -> z=0 -> loss 0.5 for both labels; r=3 desirable ->
    sigma(-2) = 0.1192; r=0 undesirable -> sigma(-1) = 0.2689; r=3 undesirable -> sigma(2) = 0.8808.
    """
    out = _run([1.0, 1.0, 3.0, 0.0, 3.0], [True, False, True, False, False], kl=1.0, beta=1.0)
    torch.testing.assert_close(
        out.losses,
        torch.tensor([0.5, 0.5, SIG[-2], SIG[-1], SIG[2]], dtype=torch.float64),
    )
    assert out.kl.item() == 1.0


def test_beta_scales_the_log_ratio():
    """beta=0.1, r=10, kl=0: z = 1 -> desirable sigma(-1) = 0.2689; rewards = 0.1 * 10 = 1.0.
    With kl=5: z = 0.1 * (10 - 5) = 0.5 -> sigma(-0.5) = 0.3775."""
    out = _run([10.0], [True], beta=0.1)
    assert out.losses.item() == pytest.approx(SIG[-1], abs=1e-10)
    assert out.rewards.item() == pytest.approx(1.0, abs=1e-12)
    out = _run([10.0], [True], kl=5.0, beta=0.1)
    assert out.losses.item() == pytest.approx(0.3775, abs=1e-4)


def test_apo_zero_unpaired_hand_values_ignore_kl():
    """beta=0.5, r = +2, -2: z = beta*r = +1, -1.

    desirable:   1 - sigma(z) -> r=+2: sigma(-1) = 0.2689; r=-2: sigma(1) = 0.7311
    undesirable: sigma(z)     -> r=+2: sigma(1)  = 0.7311; r=-2: sigma(-1) = 0.2689
    kl=3 must not change anything; lambda_D=3, lambda_U=2 still scale:
    3 * 0.2689, 3 * 0.7311, 2 * 0.7311, 2 * 0.2689 = 0.8068, 2.1932, 1.4621, 0.5379.
    """
    labels = [True, True, False, False]
    r = [2.0, -2.0, 2.0, -2.0]
    expected = torch.tensor([SIG[-1], SIG[1], SIG[1], SIG[-1]], dtype=torch.float64)
    for kl in (0.0, 3.0):
        out = _run(r, labels, kl=kl, beta=0.5, loss_type="apo_zero_unpaired")
        torch.testing.assert_close(out.losses, expected)
    out = _run(r, labels, kl=3.0, beta=0.5, desirable_weight=3.0, undesirable_weight=2.0,
               loss_type="apo_zero_unpaired")
    torch.testing.assert_close(out.losses, expected * torch.tensor([3.0, 3.0, 2.0, 2.0],
                                                                   dtype=torch.float64))
    assert [round(x, 4) for x in out.losses.tolist()] == [0.8068, 2.1932, 1.4621, 0.5379]


def test_rewards_are_beta_logratio_and_detached():
    ref = torch.tensor([-5.0, -7.0, -1.0], dtype=torch.float64)
    policy = torch.tensor([-4.0, -9.0, -1.5], dtype=torch.float64, requires_grad=True)
    out = kto_loss(policy, ref, torch.tensor([True, False, True]), torch.tensor(0.2), beta=0.5)
    torch.testing.assert_close(out.rewards, torch.tensor([0.5, -1.0, -0.25], dtype=torch.float64))
    assert not out.rewards.requires_grad
    assert out.losses.requires_grad


def _prop41_grad(logratio, desirable, kl, beta, w_d, w_u):
    """Proposition 4.1: dL/d(policy_logps) = lambda(y) * beta * sigma(z) * sigma(-z),
    z = beta * (logratio - kl), lambda = -lambda_D (desirable), +lambda_U (undesirable)."""
    z = beta * (logratio - kl)
    lam = torch.where(desirable, torch.full_like(z, -w_d), torch.full_like(z, w_u))
    return lam * beta * torch.sigmoid(z) * torch.sigmoid(-z)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 3.0])
@pytest.mark.parametrize("kl", [0.0, 0.7, 4.2])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 1.0), (0.25, 2.5)])
def test_gradient_matches_proposition_4_1(beta, kl, weights):
    gen = torch.Generator().manual_seed(int(beta * 100) + int(kl * 10))
    b = 64
    ref = -50 * torch.rand(b, generator=gen, dtype=torch.float64)
    policy = (ref + 8 * torch.randn(b, generator=gen, dtype=torch.float64)).requires_grad_()
    desirable = torch.rand(b, generator=gen) < 0.5
    kl_t = torch.tensor(kl, dtype=torch.float64, requires_grad=True)
    out = kto_loss(policy, ref, desirable, kl_t, beta=beta,
                   desirable_weight=weights[0], undesirable_weight=weights[1])
    out.losses.sum().backward()
    expected = _prop41_grad(policy.detach() - ref, desirable, kl, beta, *weights)
    torch.testing.assert_close(policy.grad, expected, rtol=1e-12, atol=1e-15)
    # The reference point is a constant of the loss (no gradient through kl).
    assert kl_t.grad is None
    # Sanity: the check is not vacuous - gradients are of order beta * lambda / 4 somewhere.
    assert policy.grad.abs().max() > 1e-4 * beta


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize(
    "desirable", [[True], [False], [True] * 4, [False] * 4], ids=["B1-D", "B1-U", "allD", "allU"]
)
def test_single_class_and_b1_batches_are_finite_and_exact(loss_type, desirable):
    """One-class batches give exactly the per-class formula, finite losses and gradients.
    r = 1, kl = 0.5, beta = 2 -> z = 2 * (1 - 0.5) = 1 (kto) or 2 * 1 = 2 (apo);
    desirable sigma(-z), undesirable sigma(z)."""
    b = len(desirable)
    ref = torch.full((b,), -3.0, dtype=torch.float64)
    policy = (ref + 1.0).requires_grad_()
    out = kto_loss(policy, ref, torch.tensor(desirable), torch.tensor(0.5), beta=2.0,
                   loss_type=loss_type)
    z = 1.0 if loss_type == "kto" else 2.0
    want = 1 / (1 + math.exp(z)) if desirable[0] else 1 / (1 + math.exp(-z))
    torch.testing.assert_close(out.losses, torch.full((b,), want, dtype=torch.float64))
    out.losses.mean().backward()
    assert torch.isfinite(policy.grad).all() and (policy.grad != 0).all()


def test_extreme_logratios_are_finite():
    """|beta * r| = 1e4 saturates the sigmoid; losses are 0 or lambda, gradients 0, no NaN."""
    ref = torch.zeros(4)
    policy = torch.tensor([1e5, -1e5, 1e5, -1e5], requires_grad=True)
    out = kto_loss(policy, ref, torch.tensor([True, True, False, False]), torch.tensor(0.0),
                   beta=0.1, undesirable_weight=2.0)
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    out.losses.sum().backward()
    assert torch.isfinite(policy.grad).all()


def test_dtype_follows_logps():
    """float32 log-probs with the float32 kl from finalize_kl stay float32; float64 stay float64."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.tensor([-1.0, -2.0], dtype=dtype)
        kl = torch.tensor(0.1, dtype=torch.float32)
        out = kto_loss(x, x - 1, torch.tensor([True, False]), kl)
        assert out.losses.dtype == dtype and out.rewards.dtype == dtype


def test_unknown_loss_type_names_allowed_values():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid.*allowed values: kto, apo_zero_unpaired"):
        kto_loss(x, x, torch.tensor([True, False]), torch.tensor(0.0), loss_type="sigmoid")


@pytest.mark.parametrize(
    "policy,ref,desirable,kl",
    [
        (torch.zeros(3), torch.zeros(2), torch.ones(3, dtype=torch.bool), torch.tensor(0.0)),
        (torch.zeros(3), torch.zeros(3), torch.ones(3), torch.tensor(0.0)),  # not bool
        (torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.zeros(3)),
        (torch.zeros(3, 1), torch.zeros(3, 1), torch.ones(3, 1, dtype=torch.bool),
         torch.tensor(0.0)),
    ],
    ids=["ref-shape", "mask-dtype", "kl-not-scalar", "2d"],
)
def test_bad_shapes_raise(policy, ref, desirable, kl):
    with pytest.raises(ValueError):
        kto_loss(policy, ref, desirable, kl)


def test_slopes_are_the_sigmoid_derivative_over_a_quarter():
    """slope = 4 sigma(z) sigma(-z), z = beta (logratio - kl) for kto and beta logratio for
    apo_zero_unpaired. beta 1, kl 1: logratios [2, 1, 0, -1, -2] give z = [1, 0, -1, -2, -3]."""
    out = _run(LOGRATIOS, [True, False, True, False, True], kl=1.0, beta=1.0)

    def slope(z):
        return 4 / ((1 + math.exp(-z)) * (1 + math.exp(z)))

    assert slope(0) == 1.0 and slope(2) == pytest.approx(0.41997434161)  # 4 e^-2 / (1 + e^-2)^2
    want = torch.tensor([slope(z) for z in (1, 0, -1, -2, -3)], dtype=torch.float64)
    torch.testing.assert_close(out.slopes, want, rtol=1e-12, atol=0)
    assert not out.slopes.requires_grad
    apo = _run(LOGRATIOS, [True] * 5, kl=1.0, beta=1.0, loss_type="apo_zero_unpaired")
    want = torch.tensor([slope(z) for z in LOGRATIOS], dtype=torch.float64)
    torch.testing.assert_close(apo.slopes, want, rtol=1e-12, atol=0)


def test_slope_is_the_gradient_share():
    """d loss / d policy_logp = -+ lambda * beta * slope / 4 (Proposition 4.1), for both classes."""
    ref = torch.tensor([-10.0, -20.0, -30.0], dtype=torch.float64)
    policy = (ref + torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)).requires_grad_()
    desirable = torch.tensor([True, False, False])
    out = kto_loss(policy, ref, desirable, torch.tensor(0.7, dtype=torch.float64), beta=0.3,
                   desirable_weight=1.5, undesirable_weight=0.5)
    out.losses.sum().backward()
    sign = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    weight = torch.tensor([1.5, 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(policy.grad, sign * weight * 0.3 * out.slopes / 4, rtol=1e-12, atol=0)


def test_row_weights_scale_exactly_their_rows_term():
    """lambda_D=2, lambda_U=0.5, beta=1, kl=0.5; row weights 1, 3, 0, 0.25, 2 multiply each row's
    term after lambda: w=3 on r=+1 U gives 3 * 0.5 * sigma(1 - 0.5) = 1.5 * 0.62246 = 0.93369;
    w=0 on r=0 D gives 0; and every weighted row equals w times the unweighted one, exactly."""
    w = torch.tensor([1.0, 3.0, 0.0, 0.25, 2.0], dtype=torch.float64)
    kw = dict(beta=1.0, desirable_weight=2.0, undesirable_weight=0.5, kl=0.5)
    desirable = [True, False, True, False, True]
    plain = _run(LOGRATIOS, desirable, **kw)
    weighted = _run(LOGRATIOS, desirable, weights=w, **kw)
    assert torch.equal(weighted.losses, plain.losses * w)
    assert weighted.losses[1].item() == pytest.approx(1.5 / (1 + math.exp(-0.5)), abs=1e-12)
    assert weighted.losses[1].item() == pytest.approx(0.93369, abs=1e-5)
    assert weighted.losses[2].item() == 0.0
    # Rewards, slopes and the reference point do not depend on the weights.
    assert torch.equal(weighted.rewards, plain.rewards) and torch.equal(weighted.slopes, plain.slopes)
    assert torch.equal(weighted.kl, plain.kl)
    # Weights of 1 give the unweighted losses bit for bit.
    ones = _run(LOGRATIOS, desirable, weights=torch.ones(5, dtype=torch.float64), **kw)
    assert torch.equal(ones.losses, plain.losses)


def test_row_weight_scales_the_gradient_and_zero_gives_none():
    """d(w * loss_i)/d log pi_i = w * dloss_i/d log pi_i: with beta=1, kl=0, lambda=1 and r=0 the
    unweighted gradient is -sigma(0)sigma(0) = -0.25 (desirable) and +0.25 (undesirable); weights
    (2, 0, 0.5, 0) make it -0.5, 0, +0.125, 0."""
    policy = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(4, dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False])
    w = torch.tensor([2.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    kto_loss(policy, ref, desirable, torch.tensor(0.0), beta=1.0, weights=w).losses.sum().backward()
    assert policy.grad.tolist() == [-0.5, 0.0, 0.125, 0.0]


def test_weights_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"weights must be \(B,\) = \(5,\); got \(4,\)"):
        _run(LOGRATIOS, [True] * 5, weights=torch.ones(4))
