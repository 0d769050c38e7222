"""Robustness curves (Figures 2-3): accuracy under PGD as the perturbation grows."""

from __future__ import annotations

import math

import torch

from ..attacks import attack_survivors, evaluating, geometry, pgd
from ..errors import UserError
from ..formats import is_grey_levels
from ..runtime import derive_seed
from .scores import check_pair, class_scores, device_of

#: The paper's robustness-curve grid for L-inf: 8/255 to 16/255 in steps of 1/255.
LINF_EPS_VALUES = tuple(i / 255 for i in range(8, 17))


#: The analogous grid for L2: 0.5 to 1.0 (the radius doubles, as in the paper).
L2_EPS_VALUES = tuple(0.5 + 0.0625 * i for i in range(9))


L1_EPS_VALUES = tuple(float(i) for i in range(8, 17))


def default_eps_values(norm: str = "linf") -> tuple[float, ...]:
    """The default robustness-curve grid: 8/255..16/255 for ``linf``, 0.5..1.0 for ``l2``, 8..16
    for ``l1`` (around CIFAR-10's customary 12)."""
    geometry(norm)
    return {"linf": LINF_EPS_VALUES, "l2": L2_EPS_VALUES, "l1": L1_EPS_VALUES}[norm]


def robustness_curve(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps_values=None,
                     norm: str = "linf", steps: int = 20, loss: str = "ce", seed: int = 0,
                     batch_size: int = 256, device=None) -> list[dict]:
    """Robust accuracy under PGD-``steps`` at each perturbation size (Figures 2-3).

    Each eps runs ``attacks.pgd`` with step size eps/4, one random start and the given
    loss, the model inside ``evaluating(model)``. The eps values are processed in increasing
    order and only points that survived every smaller eps are attacked: an adversarial
    example found at a smaller eps lies inside every larger ball, so the accuracy at eps is
    the worst case over all attacks with radius <= eps, and the curve is non-increasing.

    Args:
        model: maps images [N, C, H, W] in [0, 1] to class scores [N, k].
        x: images [N, C, H, W] in [0, 1]; y: labels [N] (int64).
        eps_values: perturbation sizes in pixel units (default ``default_eps_values(norm)``:
            8/255..16/255 in steps of 1/255 for linf).
        norm: ``linf`` or ``l2``.
        steps: PGD iterations (20 as in the paper).
        loss: attack loss, a key of ``attacks.LOSSES`` (default ``ce``).
        seed: seeds every random start (each eps and batch derives its own seed).
        batch_size: examples per attack call.
        device: where to run; default: the model's device.

    Returns:
        One dict per eps, in increasing eps order: ``eps``, ``accuracy`` (fraction of the N
        points classified correctly under every attack of radius <= eps; misclassified clean
        points count as wrong), ``n``.
    """
    geometry(norm)
    check_pair(x, y)
    eps_list = sorted(float(e) for e in (default_eps_values(norm) if eps_values is None else eps_values))
    if not eps_list:
        raise UserError("eps_values is empty: give at least one perturbation size")
    if eps_list[0] < 0 or not all(math.isfinite(e) for e in eps_list):
        raise UserError(f"eps_values must be finite and >= 0; got {eps_list}")
    device = device_of(model, device)
    y = y.cpu()
    curve = []
    with evaluating(model):
        robust = class_scores(model, x, batch_size, device).argmax(1) == y
        for eps in eps_list:
            if eps > 0:
                attack_survivors(model, lambda xb, yb, start, eps=eps: pgd(
                    model, xb, yb, eps=eps, alpha=eps / 4, steps=steps, norm=norm, loss=loss,
                    seed=derive_seed(seed, "robustness-curve", repr(eps), start)), x, y, robust,
                    batch_size=batch_size, device=device)
            curve.append({"eps": eps, "accuracy": robust.float().mean().item(), "n": len(y)})
    return curve


def curve_eps_values(eps: float, norm: str) -> list[float]:
    """From the run's eps to twice it in 9 steps (8/255..16/255 at the default threat model)."""
    if norm == "linf" and is_grey_levels(eps):
        steps = round(eps * 255)
        return [min(i, 255) / 255 for i in range(steps, 2 * steps + 1, max(1, steps // 8))]
    return [min(eps * (1 + i / 8), 1.0) if norm == "linf" else eps * (1 + i / 8) for i in range(9)]
