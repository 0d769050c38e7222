"""Projected gradient descent (the one PGD) and FGSM as its single-step case."""

from __future__ import annotations

import torch

from .context import (
    check_attack_inputs,
    check_int,
    check_number,
    check_targets,
    keep_worst_case,
    loss_and_grad,
    make_generator,
    random_start as draw_start,
    with_eot,
)
from .losses import get_loss
from ..errors import UserError


def pgd(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    loss="ce",
    restarts: int = 1,
    random_start: bool = True,
    targets: torch.Tensor | None = None,
    early_stop: bool = True,
    seed: int = 0,
    return_trace: bool = False,
    eot: int = 1,
):
    """Projected gradient ascent on an attack loss (Madry et al., ICLR 2018).

    Threat model: white box, perturbation in the ``norm`` ball of radius ``eps`` around
    ``x``, intersected with the image box [0, 1]. Each step moves ``alpha`` along the
    norm's steepest-ascent direction of the loss gradient (sign for L-inf, normalised
    gradient for L2) and projects back (``attacks.geometry``).

    Args:
        model: ``nn.Module`` (or callable) mapping images [N, C, H, W] in [0, 1] to class
            scores [N, k]. Its mode is not touched: call inside ``with evaluating(model):``.
        x: clean images [N, C, H, W], float, values in [0, 1].
        y: true labels [N], int64.
        eps: radius of the threat ball, in pixel units (8/255 = eight grey levels), >= 0. For
            L-inf, also a tensor broadcastable to ``x``: a radius per coordinate, as a threat
            model written in other units needs (the diagnostic protocols of
            ``evaluation.protocols`` reproduce one in normalised units).
        alpha: step length, same units as ``eps``, > 0 (e.g. 2/255 for L-inf).
        steps: number of gradient steps, >= 0.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"`` (the sparse step of ``geometry.L1``: sign(grad)
            on the top ``L1.DENSITY`` (20%) of coordinates by |grad|).
        loss: a name in ``LOSSES`` (default ``"ce"``) or a loss callable.
        restarts: independent random starts, >= 1 (default 1); each example keeps its worst
            case: an iterate that misclassifies it, else the run with the highest final loss.
        random_start: start uniformly in the ball (default True) rather than at ``x``.
        targets: target classes [N] (int64) for a targeted loss, or None (default).
        early_stop: default True: an example is frozen at its first misclassifying iterate
            (misclassified means ``argmax != y``, also with a targeted loss)
            and dropped from the batch (so the attack gets cheaper as it succeeds), and
            restarts only run on examples still classified correctly. False: every step
            runs on every example and the final iterate is returned (adversarial training,
            loss traces).
        seed: seed of the attack's own CPU generator (default 0); the global RNG is unused.
        return_trace: also return the mean loss over the batch at each iterate of the first
            restart, shape [steps + 1] (examples frozen by early stopping count with their
            loss when frozen); for the "loss rises" sanity check.
        eot: gradient samples per step, >= 1 (default 1): for a randomised model, loss,
            scores and input gradient are averaged over ``eot`` forward and backward passes
            (Expectation over Transformation); 1 is plain PGD at no extra cost.

    Returns:
        ``x_adv`` [N, C, H, W] on ``x.device``, or ``(x_adv, trace)`` with ``return_trace``.
    """
    x, y, geom, eps = check_attack_inputs(x, y, eps, norm, per_coordinate=True)
    alpha = check_number("alpha", alpha, strict=True)
    steps = check_int("steps", steps, minimum=0)
    restarts = check_int("restarts", restarts, minimum=1)
    targets = check_targets(targets, y)
    loss_fn = with_eot(get_loss(loss), eot)
    if restarts > 1 and not random_start:
        raise UserError("restarts > 1 without random_start repeat the same run; set random_start=True")
    generator = make_generator(seed)
    n = x.shape[0]
    x_adv = x.clone()
    best_loss = torch.full((n,), float("-inf"), device=x.device)
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    trace = torch.zeros(steps + 1, device=x.device)
    for restart in range(restarts):
        start = draw_start(geom, x, eps, generator) if random_start else x
        active = (~fooled).nonzero().squeeze(1) if early_stop else torch.arange(n, device=x.device)
        if active.numel() == 0:
            break
        run = _pgd_run(
            model, loss_fn, geom, x[active], y[active], None if targets is None else targets[active],
            start[active], eps=eps[active] if torch.is_tensor(eps) else eps, alpha=alpha, steps=steps, early_stop=early_stop,
            score_last=restarts > 1 or return_trace,
        )
        run_x, run_loss, run_fooled, run_trace = run
        if restart == 0:
            trace = run_trace
        # Worst case per example: a misclassifying run beats a robust one, then higher loss wins.
        keep_worst_case(active, run_x, run_loss, run_fooled, x_adv, best_loss, fooled)
    return (x_adv, trace) if return_trace else x_adv


def _pgd_run(model, loss_fn, geom, x, y, targets, start, *, eps, alpha, steps, early_stop, score_last=True):
    """One PGD run from ``start``: (x_adv [n, ...], loss [n], fooled [n], trace [steps + 1]).

    ``active`` indexes the examples still being attacked; with ``early_stop`` an example
    leaves it at its first misclassifying iterate, which ``out_*`` then keep.
    Without ``score_last`` the final iterate is returned without the extra forward pass
    that scores it (a single run needs no comparison); its loss is then reported as 0
    and its ``fooled`` flag as False, and the trace's last entry repeats the one before.
    """
    n = x.shape[0]
    out_x, out_loss = start.clone(), torch.empty(n, device=x.device)
    out_fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    latest = torch.empty(n, device=x.device)  # each example's latest loss, for the trace
    trace = torch.empty(steps + 1, device=x.device)
    active, x_cur = torch.arange(n, device=x.device), start
    for t in range(steps + 1):
        if t == steps and not score_last and steps > 0:
            out_x[active], out_loss[active] = x_cur, 0.0
            trace[t] = trace[t - 1]
            return out_x, out_loss, out_fooled, trace
        target = None if targets is None else targets[active]
        loss, scores, grad = loss_and_grad(model, loss_fn, x_cur, y[active], target, need_grad=t < steps)
        latest[active] = loss
        trace[t] = latest.mean()
        wrong = scores.argmax(dim=1) != y[active]
        if t == steps:
            break
        if early_stop and wrong.any():
            frozen = active[wrong]
            out_x[frozen], out_loss[frozen], out_fooled[frozen] = x_cur[wrong], loss[wrong], True
            keep = ~wrong
            active, x_cur, grad = active[keep], x_cur[keep], grad[keep]
            if active.numel() == 0:
                trace[t + 1 :] = trace[t]
                return out_x, out_loss, out_fooled, trace
        radius = eps[active] if torch.is_tensor(eps) else eps
        x_cur = geom.project(geom.step(x_cur, grad, alpha), x[active], radius)
    out_x[active], out_loss[active], out_fooled[active] = x_cur, loss, wrong
    return out_x, out_loss, out_fooled, trace


def fgsm(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    loss="ce",
    random_start: bool = False,
    alpha: float | None = None,
    seed: int = 0,
    eot: int = 1,
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al., ICLR 2015); with ``random_start`` the
    FGSM-RS step of Wong et al. ("Fast is better than free", ICLR 2020).

    Threat model: white box, ``norm`` ball of radius ``eps`` intersected with [0, 1]. It is
    ``pgd`` with one step, one restart and no early stopping: ``x_adv`` is always the
    stepped point, as in the papers (and as adversarial training needs).

    Args:
        model: maps images [N, C, H, W] in [0, 1] to class scores [N, k]; mode untouched.
        x: clean images [N, C, H, W] in [0, 1]. y: true labels [N], int64.
        eps: threat-ball radius in pixel units, >= 0.
        norm: ``"linf"`` (default, the sign step), ``"l2"`` (normalised-gradient step) or ``"l1"``
            (the sparse step of ``geometry.L1``).
        loss: a name in ``LOSSES`` (default ``"ce"``) or a loss callable.
        random_start: start uniformly in the eps-ball (default False: start at ``x``).
        alpha: step length in pixel units; default None means ``eps`` without random start
            and ``1.25 * eps`` with it (Wong et al.'s choice).
        seed: seed of the random start (default 0).
        eot: gradient samples per step, >= 1 (default 1): for a randomised model, loss,
            scores and input gradient are averaged over ``eot`` forward and backward passes
            (Expectation over Transformation); 1 is plain FGSM at no extra cost.

    Returns:
        ``x_adv`` [N, C, H, W].
    """
    eps = check_number("eps", eps)
    if alpha is None:
        alpha = 1.25 * eps if random_start else eps
    if eps == 0:  # the ball is a point; validate the rest as pgd would, then return x
        check_attack_inputs(x, y, eps, norm), with_eot(get_loss(loss), eot)
        return x.detach().clone()
    return pgd(
        model, x, y, eps=eps, alpha=alpha, steps=1, norm=norm, loss=loss,
        random_start=random_start, early_stop=False, seed=seed, eot=eot,
    )
