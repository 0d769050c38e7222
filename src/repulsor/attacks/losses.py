"""Attack losses: one function per loss, higher = more adversarial.

Every loss has the signature ``fn(model, x, y, target=None) -> (loss, scores)`` with
``x`` images [N, C, H, W] in [0, 1], ``y`` labels [N] (int64), ``target`` target classes
[N] or None, ``loss`` float32 [N] (one value per example, so attacks can sum it for the
gradient and keep it per example for worst-case selection) and ``scores`` float32 [N, k],
the model's class scores at ``x`` (so the attack learns whether ``x`` is misclassified
from the same forward pass). Everything is computed in float32: half-precision scores
lose small gradients, a classic source of gradient masking.

Score losses work on any model returning class scores: ``ce``, ``cw``, ``dlr``,
``ce_targeted``, ``dlr_targeted``. Representation losses (``proto_margin``,
``proto_linf``) need a prototype model exposing ``embed(x) -> [N, D]``,
``scores(z) -> [N, k]``, a buffer ``prototypes`` [k, D] and ``distance`` (one of
``cosine``, ``l2``, ``linf``, ``sqeuclid``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .context import check_scores, model_scores, require_classes

_TINY = 1e-12


# ---------------------------------------------------------------- score losses


def ce(model, x, y, target=None):
    """Cross-entropy of the true class; with ``target``, minus the cross-entropy toward it."""
    scores = model_scores(model, x, y, target)
    if target is not None:
        return -F.cross_entropy(scores, target, reduction="none"), scores
    return F.cross_entropy(scores, y, reduction="none"), scores


def ce_targeted(model, x, y, target=None):
    """Minus the cross-entropy toward ``target`` (required): rises as ``target`` wins."""
    _require_target("ce_targeted", target)
    return ce(model, x, y, target)


def cw(model, x, y, target=None):
    """Carlini-Wagner margin ``max_{j != y} s_j - s_y`` (positive = misclassified).

    With ``target``: ``s_t - max_{j != t} s_j`` (positive = classified as the target).
    """
    scores = model_scores(model, x, y, target)
    if target is not None:
        return score_of(scores, target) - _best_other(scores, target), scores
    return _best_other(scores, y) - score_of(scores, y), scores


def dlr(model, x, y, target=None):
    """Difference of Logits Ratio (Croce & Hein, ICML 2020), untargeted.

    ``-(s_y - max_{j != y} s_j) / (s_pi1 - s_pi3)`` with ``s_pi1 >= s_pi2 >= ...`` the sorted
    scores: the CW margin divided by a scale of the scores, so it is invariant to shifting
    and rescaling the scores. Needs k >= 3 classes. ``target`` switches to ``dlr_targeted``.
    """
    if target is not None:
        return dlr_targeted(model, x, y, target)
    scores = model_scores(model, x, y, target)
    require_classes("DLR loss", scores, 3, "use --loss cw")
    top = scores.sort(dim=1, descending=True).values
    margin = score_of(scores, y) - _best_other(scores, y)
    return -margin / (top[:, 0] - top[:, 2] + _TINY), scores


def dlr_targeted(model, x, y, target=None):
    """Targeted DLR (Croce & Hein, ICML 2020): ``-(s_y - s_t) / (s_pi1 - (s_pi3 + s_pi4) / 2)``.

    Needs ``target`` and k >= 4 classes.
    """
    _require_target("dlr_targeted", target)
    scores = model_scores(model, x, y, target)
    require_classes("targeted DLR loss", scores, 4, "use --loss ce_targeted or cw")
    top = scores.sort(dim=1, descending=True).values
    margin = score_of(scores, y) - score_of(scores, target)
    return -margin / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + _TINY), scores


# ------------------------------------------------------- representation losses


def proto_margin(model, x, y, target=None):
    """Margin in representation space: ``d(z, p_y) - min_{j != y} d(z, p_j)``, z = embed(x).

    ``d`` is the model's own distance (``cosine``: 1 - cos; ``l2``; ``linf``; ``sqeuclid``:
    squared L2). Rising moves the embedding away from its class prototype and toward the
    nearest other one; positive means a wrong prototype is nearer. With ``target``:
    ``d(z, p_y) - d(z, p_target)``. Returns the model's scores ``model.scores(z)``.
    """
    z, scores, dist = _embed(model, "proto_margin", x, y, target)
    d_true = score_of(dist, y)
    if target is not None:
        return d_true - score_of(dist, target), scores
    nearest_other = -_best_other(-dist, y)
    return d_true - nearest_other, scores


def proto_linf(model, x, y, target=None):
    """The authors' attack loss: ``||embed(x) - p_y||_inf`` (Serban et al.'s public code).

    Kept to reproduce their protocol and numbers; it ignores the decision rule, so it is a
    weak attack: use ``proto_margin`` (or ``cw``/``dlr``) for a real evaluation. With
    ``target``: ``||z - p_y||_inf - ||z - p_target||_inf``.
    """
    z, scores = _embed(model, "proto_linf", x, y, target, distances=False)
    prototypes = model.prototypes.float()
    loss = (z - prototypes[y]).abs().amax(dim=1)
    if target is not None:
        loss = loss - (z - prototypes[target]).abs().amax(dim=1)
    return loss, scores


LOSSES = {
    "ce": ce,
    "ce_targeted": ce_targeted,
    "cw": cw,
    "dlr": dlr,
    "dlr_targeted": dlr_targeted,
    "proto_margin": proto_margin,
    "proto_linf": proto_linf,
}


def get_loss(name):
    """The loss function called ``name`` (a key of ``LOSSES``); a callable passes through.

    Passing a callable with the same signature lets an adaptive attack plug in its own loss.
    """
    if callable(name):
        return name
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown attack loss {name!r}: choose one of {', '.join(LOSSES)}") from None


# --------------------------------------------------------------------- helpers


def score_of(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``scores[i, labels[i]]`` for every row, shape [N]."""
    return scores.gather(1, labels[:, None]).squeeze(1)


def _best_other(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``max_{j != labels[i]} scores[i, j]`` for every row, shape [N]."""
    own = F.one_hot(labels, scores.shape[1]).bool()
    return scores.masked_fill(own, float("-inf")).amax(dim=1)


def _require_target(name: str, target) -> None:
    if target is None:
        raise UserError(f"loss {name!r} is targeted: pass targets, or use apgd_targeted")


def _embed(model, name, x, y, target, distances=True):
    """Embedding z [N, D] (float32), scores [N, k] and, optionally, distances d(z, p_j) [N, k]."""
    if not all(hasattr(model, attr) for attr in ("embed", "scores", "distances", "prototypes")):
        raise UserError(
            f"loss {name!r} needs a prototype model (with .embed, .scores, .distances and "
            f".prototypes); got {type(model).__name__}: use --loss cw or dlr"
        )
    z_raw = model.embed(x)
    scores = model.scores(z_raw)
    check_scores(scores, x, y, target)
    z, scores = z_raw.float(), scores.float()
    if not distances:
        return z, scores
    # The head's own distances: the loss attacks exactly the rule the model classifies by.
    return z, scores, model.distances(scores)
