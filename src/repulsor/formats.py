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
