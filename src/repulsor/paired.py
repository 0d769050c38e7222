"""Paired statements about two evaluations of the same points: which points each one broke that the
other did not, and whether two models' accuracies differ beyond chance (exact McNemar test).

An evaluation records the indices of the points it left correct (``robust_indices`` in a suite,
``correct_indices`` in a diagnostic), among its first n test points; two records on the same points
can then be compared point by point, which two accuracies alone cannot do.
"""

from __future__ import annotations

import math


def discordant(correct_a, correct_b, n: int) -> tuple[int, int]:
    """``(only_a, only_b)``: points correct after evaluation a but not b, and the other way round,
    among the first ``n`` points (``correct_*``: indices of the points left correct)."""
    a, b = {i for i in correct_a if i < n}, {i for i in correct_b if i < n}
    return len(a - b), len(b - a)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for ``only_a`` and ``only_b`` discordant points: the binomial
    probability, at 1/2, of a split at least as uneven as the one seen (1.0 without discordant points)."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def paired_sentence(name_a: str, correct_a, name_b: str, correct_b, n: int) -> str:
    """``a`` and ``b`` on the same ``n`` points, in one sentence: who broke what, and the p-value."""
    only_a, only_b = discordant(correct_a, correct_b, n)
    p = mcnemar_exact(only_a, only_b)
    verdict = "a difference beyond chance" if p < 0.05 else "no difference beyond chance"
    return (f"on the same {n} points, {only_b} survive {name_b} but not {name_a} and {only_a} the other way round"
            f" (exact McNemar p = {p:.3g}: {verdict})")
