"""check_weights / auto_desirable_weight: the eq. (8) balance rule with hand-worked ratios."""

import pytest

from megakto.kto import auto_desirable_weight, check_weights


@pytest.mark.parametrize(
    "n_d,n_u,w_d,w_u",
    [
        (100, 100, 1.0, 1.0),  # 1 * 100 / (1 * 100) = 1        (lower edge)
        (4, 3, 1.0, 1.0),  # 1 * 4 / (1 * 3) = 4/3              (upper edge)
        (120, 100, 1.0, 1.0),  # 1.2                            (inside)
        (10, 100, 10.0, 1.0),  # 10 * 10 / (1 * 100) = 1
        (50, 100, 1.0, 0.5),  # 1 * 50 / (0.5 * 100) = 1
    ],
)
def test_inside_range_gives_none(n_d, n_u, w_d, w_u):
    assert check_weights(n_d, n_u, w_d, w_u) is None


def test_too_few_desirable():
    """nD=10, nU=100, lambda=1: ratio 1 * 10 / (1 * 100) = 0.1 < 1; lambda_D = 1 * 100 / 10 = 10."""
    msg = check_weights(10, 100, 1.0, 1.0)
    assert msg is not None and "\n" not in msg
    assert "1.0 * 10 / (1.0 * 100) = 0.1," in msg
    assert "desirable_weight=10.0 makes it 1" in msg
    assert "eq. 8" in msg


def test_too_many_desirable():
    """nD=100, nU=10: ratio 10 > 4/3; lambda_D = 1 * 10 / 100 = 0.1."""
    msg = check_weights(100, 10, 1.0, 1.0)
    assert "= 10," in msg and "desirable_weight=0.1 makes it 1" in msg


def test_just_above_upper_edge():
    """nD=3, nU=2: ratio 1.5 > 4/3 = 1.3333; lambda_D = 2 / 3 = 0.666667."""
    msg = check_weights(3, 2, 1.0, 1.0)
    assert "= 1.5," in msg and "desirable_weight=0.666667" in msg


def test_just_below_lower_edge_shows_digits_that_differ_from_1():
    """nD=499997, nU=500003 (a random half of a million rows): ratio 0.999988 < 1, printed with
    enough digits not to read "= 1, outside [1, 4/3]"; lambda_D = 500003 / 499997 = 1.000012."""
    msg = check_weights(499997, 500003, 1.0, 1.0)
    assert "= 0.999988," in msg and "desirable_weight=1.000012 makes it 1" in msg


def test_undesirable_weight_enters_ratio_and_suggestion():
    """nD=50, nU=100, lambda_D=1, lambda_U=2: ratio 50 / 200 = 0.25; lambda_D = 2 * 100 / 50 = 4."""
    msg = check_weights(50, 100, 1.0, 2.0)
    assert "= 0.25," in msg and "desirable_weight=4.0 makes it 1" in msg


@pytest.mark.parametrize("n_d,n_u", [(0, 10), (10, 0), (0, 0)])
def test_empty_class_gives_none(n_d, n_u):
    assert check_weights(n_d, n_u, 1.0, 1.0) is None


@pytest.mark.parametrize(
    "n_d,n_u,w_u,expected",
    [(10, 100, 1.0, 10.0), (100, 10, 1.0, 0.1), (3, 7, 1.5, 3.5), (1, 1, 0.3, 0.3)],
)
def test_auto_weight_makes_ratio_one(n_d, n_u, w_u, expected):
    """lambda_D = lambda_U * nU / nD, e.g. 1.5 * 7 / 3 = 3.5;
    then lambda_D * nD / (lambda_U * nU) = 3.5 * 3 / (1.5 * 7) = 1."""
    w_d = auto_desirable_weight(n_d, n_u, w_u)
    assert w_d == pytest.approx(expected)
    assert w_d * n_d / (w_u * n_u) == pytest.approx(1.0)
    assert check_weights(n_d, n_u, w_d, w_u) is None


@pytest.mark.parametrize("n_d,n_u", [(0, 10), (10, 0)])
def test_auto_weight_needs_both_classes(n_d, n_u):
    with pytest.raises(ValueError, match="both classes"):
        auto_desirable_weight(n_d, n_u, 1.0)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        check_weights(-1, 10, 1.0, 1.0)
    with pytest.raises(ValueError):
        check_weights(10, 10, 0.0, 1.0)
    with pytest.raises(ValueError):
        auto_desirable_weight(10, 10, -1.0)
