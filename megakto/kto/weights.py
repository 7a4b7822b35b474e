"""Class weights lambda_D and lambda_U, and the balance rule of eq. (8).

The paper recommends choosing the weights so that

    lambda_D * n_D / (lambda_U * n_U)  in  [1, 4/3]        (eq. 8)

i.e. the desirable side carries as much total weight as the undesirable side, or up to a third
more (loss aversion). Outside that range training still runs, so the check warns
rather than fails.

With per-row weights (data's ``weight`` column), n_D and n_U are each class's summed row weights:
a row of weight w pulls on the loss as w rows of weight 1 would, so the weighted sums are the
counts eq. (8) balances. The functions take any non-negative numbers for the counts.
"""

__all__ = ["check_weights", "auto_desirable_weight", "RATIO_RANGE"]

RATIO_RANGE = (1.0, 4.0 / 3.0)


def _check_args(n_desirable: int, n_undesirable: int, *weights: float) -> None:
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError(
            f"counts must be >= 0; got n_desirable={n_desirable}, n_undesirable={n_undesirable}"
        )
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be > 0; got {', '.join(str(w) for w in weights)}")


def auto_desirable_weight(n_desirable: int, n_undesirable: int, undesirable_weight: float) -> float:
    """The lambda_D that makes the eq. (8) ratio exactly 1: lambda_U * n_U / n_D."""
    _check_args(n_desirable, n_undesirable, undesirable_weight)
    if n_desirable == 0 or n_undesirable == 0:
        raise ValueError(
            f"cannot balance weights with n_desirable={n_desirable}, "
            f"n_undesirable={n_undesirable}: both classes must be present"
        )
    return undesirable_weight * n_undesirable / n_desirable


def check_weights(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """A one-line warning when the eq. (8) ratio falls outside [1, 4/3], else None.

    Returns None when either class is empty: the ratio is undefined there, and single-class data
    is reported by :func:`megakto.data.rows.require_both_classes`.
    """
    _check_args(n_desirable, n_undesirable, desirable_weight, undesirable_weight)
    if n_desirable == 0 or n_undesirable == 0:
        return None
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    low, high = RATIO_RANGE
    if low <= ratio <= high:
        return None
    suggested = auto_desirable_weight(n_desirable, n_undesirable, undesirable_weight)
    return (
        f"desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = "
        f"{desirable_weight} * {n_desirable} / ({undesirable_weight} * {n_undesirable}) = "
        f"{ratio:.6g}, outside [1, 4/3] recommended by the KTO paper (eq. 8); "
        f"desirable_weight={round(suggested, 6)} makes it 1"
    )
