"""How numbers read: the one place that decides how an eps is written.

An L-inf eps that is a whole number of grey levels reads as ``k/255`` (8/255); any other eps
(MNIST's 0.3, an L2 radius) as the plain number, never as ``76.5/255``.
"""

from __future__ import annotations


def is_grey_levels(eps: float) -> bool:
    """Whether ``eps`` is a whole number of grey levels (k/255), so that "k/255" reads naturally."""
    return abs(eps * 255 - round(eps * 255)) < 1e-6


def format_eps(eps, norm: str, *, short: bool = False) -> str:
    """``0.03137 (8/255)`` (``8/255`` when ``short``) for an L-inf eps of whole grey levels, the
    plain number otherwise (4 significant digits; all of them when ``short``); a dash for None."""
    if eps is None:
        return "–"
    grey = norm == "linf" and is_grey_levels(eps)
    if short:
        return f"{round(eps * 255)}/255" if grey else f"{eps:g}"
    return f"{eps:.4g} ({round(eps * 255)}/255)" if grey else f"{eps:.4g}"


def as_number(value):
    """A JSON value as a float, or None when it is not a number (a missing or null field)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# The normal quantile of a two-sided 95% interval.
_Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of an accuracy measured as ``correct`` of ``n`` points.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n:
    0 of 500 gives [0, 0.0076], so a 0.0% read on 500 points is not a certainty.
    """
    if n <= 0:
        raise ValueError(f"an interval needs n >= 1 points, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, {n}], got {correct}")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n)
    # At 0/n and n/n the bound is exactly 0 or 1; computed, it would carry a rounding error.
    return (0.0 if correct == 0 else max(0.0, centre - half)), (1.0 if correct == n else min(1.0, centre + half))


def accuracy_with_interval(accuracy, n) -> str:
    """``84.0 [75.6, 89.9]``: an accuracy in % with its 95% Wilson interval on ``n`` points."""
    if accuracy is None or not n:
        return "–"
    low, high = wilson_interval(round(accuracy * n), int(n))
    return f"{100 * accuracy:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
