"""FAB: the fast adaptive boundary attack, untargeted and targeted (FAB-T).

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack", ICML 2020. FAB looks for the adversarial point closest to the clean image: at
each step it linearises the decision boundary between the true class and another class,
projects both the current point and the clean image onto that hyperplane intersected with
the image box [0, 1], moves to a biased combination of the two projections (extrapolated
by ``eta``), and after every success steps back toward the clean image (by ``beta``), so
the search keeps shrinking the perturbation. AutoAttack's standard cascade runs the
targeted version against the nine most likely wrong classes, one after the other.

White-box: it needs gradients of the class scores with respect to the input only (via
``torch.autograd.grad``); it never switches the model's mode and never creates parameter
gradients. Norms and the final projection come from :mod:`repulsor.attacks.geometry`.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from .context import (
    check_attack_inputs,
    check_int,
    check_number,
    check_targets,
    input_grad,
    make_generator,
    model_scores,
    random_start,
    require_classes,
    scores_no_grad,
    wrong_classes_by_score,
)
from .geometry import geometry
from .losses import score_of

_TINY = 1e-12


# ------------------------------------------------------ projection onto hyperplane ∩ box


def project_hyperplane_box(p: torch.Tensor, w: torch.Tensor, c: torch.Tensor, norm: str) -> torch.Tensor:
    """Smallest step ``d`` with ``<w, d> = c`` and ``p + d`` in the box [0, 1].

    Minimises ``||d||`` in the L-inf, L2 or L1 norm, row by row. Shapes: ``p``, ``w`` [n, D],
    ``c`` [n]; returns ``d`` [n, D]. When the hyperplane does not meet the box, returns
    the box corner that gets closest to it (every coordinate pushed to its bound in the
    direction that moves ``<w, d>`` toward ``c``).

    Method (exact, by sorting): for ``c > 0`` the optimum has the form
    ``d_j = sign(w_j) * min(r * a_j, b_j)`` with ``b_j`` the room to the box bound in
    direction ``sign(w_j)``, ``a_j = 1`` for L-inf and ``a_j = |w_j|`` for L2 (the L2 KKT
    point is a clipped multiple of ``w``). The reached value
    ``h(r) = sum_j s_j * min(r, t_j)`` with ``s_j = |w_j| a_j`` and ``t_j = b_j / a_j`` is
    piecewise linear and nondecreasing in ``r``; sorting the breakpoints ``t_j`` gives
    ``h`` at each of them, and the segment holding ``c`` is solved in closed form.
    ``c < 0`` is the same problem with the direction flipped. L1 is a fractional knapsack: the
    coordinates with the largest ``|w_j|`` buy the most of ``c`` per unit of norm, so they go to
    their bound one after the other, and the last one only as far as ``c`` needs.
    """
    if norm not in ("linf", "l2", "l1"):
        raise UserError(f"unknown norm {norm!r}: choose one of ['l1', 'l2', 'linf']")
    target = c.abs()
    direction = torch.sign(w) * torch.sign(c).unsqueeze(1)
    room = torch.where(direction > 0, 1 - p, torch.where(direction < 0, p, torch.zeros_like(p))).clamp_min(0)
    aw = w.abs()
    if norm == "l1":
        return direction * _knapsack(aw, room, target)
    if norm == "linf":
        s, t = aw, room
    else:
        s = aw * aw
        t = torch.where(aw > 0, room / aw.clamp_min(_TINY), torch.zeros_like(room))
    s = torch.where(t > 0, s, torch.zeros_like(s))
    t_sorted, order = t.sort(dim=1)
    s_sorted = s.gather(1, order)
    cum_st = (s_sorted * t_sorted).cumsum(dim=1)
    cum_s = s_sorted.cumsum(dim=1)
    s_total = cum_s[:, -1:]
    reached = cum_st + t_sorted * (s_total - cum_s)  # h(t_(k)), nondecreasing in k
    k = (reached < target.unsqueeze(1)).sum(dim=1)  # first breakpoint with h >= target
    feasible = k < t.shape[1]
    prev = (k - 1).clamp_min(0).unsqueeze(1)
    has_prev = (k > 0).unsqueeze(1)
    prev_st = torch.where(has_prev, cum_st.gather(1, prev), torch.zeros_like(prev, dtype=p.dtype)).squeeze(1)
    prev_s = torch.where(has_prev, cum_s.gather(1, prev), torch.zeros_like(prev, dtype=p.dtype)).squeeze(1)
    slope = (s_total.squeeze(1) - prev_s).clamp_min(_TINY)
    r = (target - prev_st) / slope
    r = torch.where(feasible, r, torch.full_like(r, math.inf))
    r = torch.where(target > 0, r, torch.zeros_like(r))
    magnitude = torch.minimum(r.unsqueeze(1), t)
    if norm == "l2":
        magnitude = magnitude * aw
    return direction * magnitude


def _knapsack(aw: torch.Tensor, room: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Magnitudes [n, D] of the smallest-L1 move reaching ``sum_j aw_j * m_j = target`` with
    0 <= m_j <= room_j: the largest ``aw`` first, each to its room, the last one partly; every
    coordinate to its room where even that falls short."""
    order = aw.argsort(dim=1, descending=True)
    a_sorted, r_sorted = aw.gather(1, order), room.gather(1, order)
    bought = (a_sorted * r_sorted).cumsum(dim=1)
    k = (bought < target.unsqueeze(1)).sum(dim=1, keepdim=True)  # coordinates used in full
    position = torch.arange(aw.shape[1], device=aw.device).unsqueeze(0)
    prev = torch.where(k > 0, bought.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(target).unsqueeze(1))
    a_k = a_sorted.gather(1, k.clamp(max=aw.shape[1] - 1)).clamp_min(_TINY)
    partial = ((target.unsqueeze(1) - prev) / a_k).clamp_min(0)
    m_sorted = torch.where(position < k, r_sorted, torch.where(position == k, torch.minimum(partial, r_sorted),
                                                                torch.zeros_like(r_sorted)))
    return torch.zeros_like(aw).scatter(1, order, m_sorted)


# ------------------------------------------------------------------------ one FAB run


def _linearise(model, xc: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, norm: str, eot: int = 1):
    """Value ``g`` [m] and input gradient ``w`` [m, D] of the score difference f_s - f_y.

    ``s`` is ``target`` when given; otherwise (untargeted FAB) the class whose linearised
    boundary is closest, ``|g_s| / ||w_s||_q`` with ``q`` the dual norm. With ``eot`` > 1
    the scores and their input gradients are means over ``eot`` forward and backward passes.
    """
    total = None
    for _ in range(eot):
        xr = xc.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = model_scores(model, xr, y, target)
            if target is not None:
                diff = score_of(scores, target) - score_of(scores, y)
                sample = (diff.detach(), input_grad(diff, xr).flatten(1))
            else:
                k = scores.shape[1]
                grads = [input_grad(scores[:, j], xr, retain_graph=j < k - 1).flatten(1) for j in range(k)]
                sample = (scores.detach(), torch.stack(grads, dim=1))  # [m, k], [m, k, D]
        total = sample if total is None else (total[0] + sample[0], total[1] + sample[1])
    if target is not None:
        return total[0] / eot, total[1] / eot
    scores, jac = total[0] / eot, total[1] / eot
    rows = torch.arange(xc.shape[0], device=xc.device)
    g_all = scores - score_of(scores, y).unsqueeze(1)
    w_all = jac - jac[rows, y].unsqueeze(1)
    dual = {"linf": lambda: w_all.abs().sum(dim=2), "l2": lambda: w_all.norm(dim=2),
            "l1": lambda: w_all.abs().amax(dim=2)}[norm]()  # the dual norm's length of each w
    dist = g_all.abs() / (dual + _TINY)
    dist[rows, y] = math.inf
    s = dist.argmin(dim=1)
    return g_all[rows, s], w_all[rows, s]


def _fab_run(model, x, y, target, *, eps, norm, steps, restarts, alpha_max, eta, beta, generator, eot):
    """FAB toward one class per example (or untargeted when ``target`` is None).

    Returns ``(best, best_norm)``: the smallest adversarial point found per example and
    its norm (``inf`` where none was found; ``best`` is then ``x``). Later restarts run
    only on points without an adversarial point inside the eps-ball yet, and start at a
    uniform random point of radius min(best norm, eps) / 2 around ``x``.
    """
    geo = geometry(norm)
    n = x.shape[0]
    best = x.clone()
    best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    for restart in range(restarts):
        idx = (best_norm > eps).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xo, yo = x[idx], y[idx]
        to = None if target is None else target[idx]
        if restart == 0:
            xc = xo.clone()
        else:
            xc = random_start(geo, xo, torch.clamp(best_norm[idx], max=eps) / 2, generator)
        xo_flat = xo.flatten(1)
        bn = best_norm[idx]
        bx = best[idx]
        for _ in range(steps):
            g, w = _linearise(model, xc, yo, to, norm, eot)
            xc_flat = xc.flatten(1)
            # The linearised boundary: g + <w, z - xc> = 0, seen from xc and from xo.
            d_cur = project_hyperplane_box(xc_flat, w, -g, norm)
            d_orig = project_hyperplane_box(xo_flat, w, -(g + (w * (xo_flat - xc_flat)).sum(dim=1)), norm)
            n_cur, n_orig = geo.norm(d_cur), geo.norm(d_orig)
            alpha = torch.where(
                n_cur + n_orig > 0, n_cur / (n_cur + n_orig).clamp_min(_TINY), torch.zeros_like(n_cur)
            ).clamp(0, alpha_max).unsqueeze(1)
            x_new = ((1 - alpha) * (xc_flat + eta * d_cur) + alpha * (xo_flat + eta * d_orig)).clamp(0, 1)
            x_new = x_new.view_as(xc)
            adv = scores_no_grad(model, x_new, yo).argmax(dim=1) != yo
            dist = geo.norm(x_new - xo)
            better = adv & (dist < bn)
            bn = torch.where(better, dist, bn)
            bx = torch.where(better.view(-1, 1, 1, 1), x_new, bx)
            # Backward step: pull successful points toward the clean image.
            xc = torch.where(adv.view(-1, 1, 1, 1), xo + beta * (x_new - xo), x_new).detach()
        best_norm[idx] = bn
        best[idx] = bx
    return best, best_norm


def _finish(model, x, y, best, best_norm, eps, norm, result):
    """Write into ``result`` the points whose best perturbation fits in the eps-ball and
    that the model still misclassifies after the final projection."""
    geo = geometry(norm)
    ok = (best_norm <= eps).nonzero().squeeze(1)
    if ok.numel() == 0:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    candidate = geo.project(best[ok], x[ok], eps)
    fooled = scores_no_grad(model, candidate, y[ok]).argmax(dim=1) != y[ok]
    result[ok[fooled]] = candidate[fooled]
    success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    success[ok[fooled]] = True
    return success


def _fab_attack(model, x, y, *, target, n_targets, eps, norm, steps, restarts, alpha_max, eta, beta, seed,
                eot):
    """``fab`` (``n_targets`` None) and ``fab_targeted`` (``target`` None): check every
    argument (one clear line on failure), then run FAB once per round on the points still
    correctly classified and not yet broken inside the eps-ball.

    The rounds: one toward ``target`` (untargeted when None) for ``fab``; for
    ``fab_targeted``, one per wrong class, the most likely first, at most ``n_targets``.
    """
    if n_targets is not None:
        check_int("n_targets", n_targets, minimum=1)
    x, y, _, eps = check_attack_inputs(x, y, eps, norm, ndim=4)
    steps = check_int("steps", steps, minimum=0)
    restarts = check_int("restarts", restarts, minimum=1)
    alpha_max = check_number("alpha_max", alpha_max, maximum=1.0)
    eta = check_number("eta", eta, minimum=1.0)
    beta = check_number("beta", beta, strict=True, maximum=1.0)
    eot = check_int("eot", eot, minimum=1)
    generator = make_generator(seed)
    target = check_targets(target, y)
    result = x.clone()
    if x.shape[0] == 0:
        return result
    clean = scores_no_grad(model, x, y, target)
    require_classes("FAB", clean, 2)
    if eps == 0:
        return result
    if n_targets is None:
        rounds = [target]
    else:
        rounds = wrong_classes_by_score(clean, y)[:, : min(n_targets, clean.shape[1] - 1)].T
    robust = clean.argmax(dim=1) == y
    for round_target in rounds:
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        best, best_norm = _fab_run(
            model, x[idx], y[idx], None if round_target is None else round_target[idx], eps=eps, norm=norm,
            steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, generator=generator, eot=eot,
        )
        sub = result[idx]
        success = _finish(model, x[idx], y[idx], best, best_norm, eps, norm, sub)
        result[idx] = sub
        robust[idx[success]] = False
    return result


def fab(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    target: torch.Tensor | None = None,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    seed: int = 0,
    eot: int = 1,
) -> torch.Tensor:
    """FAB (Croce & Hein, ICML 2020), untargeted or toward given target classes.

    Threat model: white-box, perturbations inside the ``norm`` ball of radius ``eps``
    around ``x`` intersected with the image box [0, 1]. FAB itself minimises the norm;
    ``eps`` only decides which adversarial points are returned.

    Args:
        model: ``nn.Module`` mapping [0, 1] images [N, C, H, W] to class scores [N, k], k >= 2.
        x: clean images, float [N, C, H, W] in [0, 1].
        y: true labels, int64 [N].
        eps: radius of the threat model, in pixel units (8/255 = eight grey levels), >= 0.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        steps: FAB iterations per run (default 100); each costs one forward+backward pass
            (k backward passes when untargeted) plus one forward pass.
        restarts: runs per example (default 1); the first starts at ``x``, later ones at a
            random point of radius min(best norm, eps) / 2, only on points not yet broken.
        target: None (default) for untargeted FAB (closest linearised boundary among all
            classes, needs the full Jacobian), or an int64 [N] tensor of target classes,
            each different from the true label.
        alpha_max: largest weight of the step taken from the clean image (default 0.1).
        eta: extrapolation factor beyond the linearised boundary (default 1.05, >= 1).
        beta: backward-step factor toward ``x`` after a success (default 0.9, in (0, 1]).
        seed: seed of the attack's own CPU generator (default 0); the global RNG is untouched.
        eot: gradient samples per step (default 1): for a randomised model, the scores and
            their input gradients are averaged over ``eot`` passes (Expectation over
            Transformation).

    Returns:
        ``x_adv`` [N, C, H, W]: for each correctly classified example whose smallest
        adversarial perturbation found has norm <= eps, that point (projected onto the
        eps-ball ∩ [0, 1]); ``x`` itself for every other example.
    """
    return _fab_attack(
        model, x, y, target=target, n_targets=None, eps=eps, norm=norm, seed=seed,
        steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, eot=eot,
    )


def fab_targeted(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_targets: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    seed: int = 0,
    eot: int = 1,
) -> torch.Tensor:
    """FAB-T, the targeted FAB of AutoAttack's standard cascade (Croce & Hein, ICML 2020).

    Threat model: white-box, perturbations inside the ``norm`` ball of radius ``eps``
    around ``x`` intersected with the image box [0, 1].

    For t = 1 .. min(n_targets, k - 1), the t-th most likely wrong class by clean score is
    the target; FAB (``steps`` iterations, ``restarts`` runs) moves toward the boundary
    between the true class and that target, on the points that are correctly classified
    and not yet broken inside the eps-ball. A point counts as broken when it is
    misclassified (any wrong class) at a perturbation of norm <= eps.

    Args:
        model: ``nn.Module`` mapping [0, 1] images [N, C, H, W] to class scores [N, k], k >= 2.
        x: clean images, float [N, C, H, W] in [0, 1].
        y: true labels, int64 [N].
        eps: radius of the threat model, in pixel units (8/255 = eight grey levels), >= 0.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        steps: FAB iterations per target and run (default 100); each costs one
            forward+backward pass and one forward pass.
        n_targets: number of target classes tried (default 9, capped at k - 1).
        restarts: runs per target (default 1); the first starts at ``x``, later ones at a
            random point of radius min(best norm, eps) / 2.
        alpha_max: largest weight of the step taken from the clean image (default 0.1).
        eta: extrapolation factor beyond the linearised boundary (default 1.05, >= 1).
        beta: backward-step factor toward ``x`` after a success (default 0.9, in (0, 1]).
        seed: seed of the attack's own CPU generator (default 0); the global RNG is untouched.
        eot: gradient samples per step (default 1): for a randomised model, the scores and
            their input gradients are averaged over ``eot`` passes (Expectation over
            Transformation).

    Returns:
        ``x_adv`` [N, C, H, W]: the smallest adversarial point found for each broken
        example (projected onto the eps-ball ∩ [0, 1]); ``x`` itself for the others.
    """
    return _fab_attack(
        model, x, y, target=None, n_targets=n_targets, eps=eps, norm=norm, seed=seed,
        steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, eot=eot,
    )
