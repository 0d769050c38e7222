"""Square Attack: a score-based black-box attack by random square-shaped updates.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020. The attack only reads class scores
(forward passes under ``torch.no_grad``, never a gradient), so a defence that hides or
breaks gradients does not stop it. It minimises the margin ``s_y - max_{j != y} s_j`` by
random search: each iteration proposes a change confined to a random square window and
keeps it only if the margin decreases. The window covers a fraction ``p`` of the image,
halved on a fixed schedule. AutoAttack's standard cascade runs it with 5000 queries.
The margin is minus the ``cw`` loss of :mod:`repulsor.attacks.losses`, which the code
maximises, as the other attacks do with their losses.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError

from .context import check_attack_inputs, check_int, check_number, keep_worst_case, make_generator, require_classes
from .geometry import geometry
from .losses import cw

_TINY = 1e-12
_SIGN_DRAWS = 10  # L-inf proposals: draws of window signs tried until the image changes
# Iterations (on a 10,000-query scale) after which p halves, as in the paper.
_P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def _p_at(p_init: float, iteration: int, queries: int) -> float:
    """The fraction of pixels changed at ``iteration``, the schedule rescaled to ``queries``."""
    rescaled = int(iteration / queries * 10000)
    halvings = sum(1 for threshold in _P_SCHEDULE if rescaled > threshold)
    return p_init / 2**halvings


def _side(p: float, height: int, width: int, norm: str) -> int:
    """Side of the square window covering about a fraction ``p`` of the image."""
    side = int(round(math.sqrt(p * height * width)))
    if norm == "l2":
        side = max(side, 3)
        side += 1 - side % 2  # odd, so the window has a centre pixel
    return max(1, min(side, min(height, width) - 1 if min(height, width) > 1 else 1))


def _pyramid(rows: int, cols: int, dtype) -> torch.Tensor:
    """The paper's nested-squares bump on a rows x cols rectangle.

    The value at Chebyshev distance ``d`` from the centre (rows // 2, cols // 2) is
    ``sum_{j = d + 1}^{n} 1 / j^2`` with ``n = max(rows, cols) // 2 + 1``.
    """
    n = max(rows, cols) // 2 + 1
    i = torch.arange(rows, dtype=dtype).sub(rows // 2).abs().view(-1, 1)
    j = torch.arange(cols, dtype=dtype).sub(cols // 2).abs().view(1, -1)
    d = torch.maximum(i, j).long()
    terms = 1.0 / torch.arange(1, n + 1, dtype=dtype) ** 2
    tail = terms.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{j >= d + 1} 1 / j^2
    return tail[d.clamp(max=n - 1)] if rows and cols else torch.zeros(rows, cols, dtype=dtype)


def _window_pattern(side: int, dtype) -> torch.Tensor:
    """Unit-L2 pattern for an update window: two bumps of opposite sign, stacked."""
    top = side // 2
    pattern = torch.cat([_pyramid(top, side, dtype), -_pyramid(side - top, side, dtype)], dim=0)
    return pattern / pattern.norm()


def _place(patterns: torch.Tensor, row: torch.Tensor, col: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Put per-example ``side x side`` patterns [m, side, side] at (row, col) on a zero
    [m, 1, height, width] canvas. ``row``, ``col``: int64 [m]."""
    m, side = patterns.shape[0], patterns.shape[1]
    i = torch.arange(height, device=patterns.device).view(1, -1, 1) - row.view(-1, 1, 1)
    j = torch.arange(width, device=patterns.device).view(1, 1, -1) - col.view(-1, 1, 1)
    inside = (i >= 0) & (i < side) & (j >= 0) & (j < side)
    flat = (i.clamp(0, side - 1) * side + j.clamp(0, side - 1)).view(m, -1)
    values = patterns.reshape(m, -1).gather(1, flat).view(m, height, width)
    return torch.where(inside, values, torch.zeros_like(values)).unsqueeze(1)


def _window_mask(row, col, side, height, width, device) -> torch.Tensor:
    """Boolean [m, 1, height, width] mask of the square windows at (row, col)."""
    i = torch.arange(height, device=device).view(1, -1, 1) - row.view(-1, 1, 1)
    j = torch.arange(width, device=device).view(1, 1, -1) - col.view(-1, 1, 1)
    return ((i >= 0) & (i < side) & (j >= 0) & (j < side)).unsqueeze(1)


def _signs(shape, generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform random signs ±1, drawn on the CPU generator, on ``like``'s device and dtype."""
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(device=like.device, dtype=like.dtype)


def _positions(m, side, height, width, generator, device):
    row = torch.randint(0, height - side + 1, (m,), generator=generator).to(device)
    col = torch.randint(0, width - side + 1, (m,), generator=generator).to(device)
    return row, col


def _l2_normalise(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Rescale each perturbation [m, C, H, W] to L2 norm ``eps``."""
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return delta * (eps / norms.clamp_min(_TINY))


def _init(x: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    """The paper's starting point: vertical stripes (L-inf) or a grid of bumps (L2)."""
    n, c, h, w = x.shape
    if norm == "linf":
        return (x + eps * _signs((n, c, 1, w), generator, x)).clamp(0, 1)
    tile = max(min(h, w) // 5, 1)
    rows, cols = h // tile, w // tile
    top, left = (h - rows * tile) // 2, (w - cols * tile) // 2
    base = _window_pattern(tile, x.dtype).to(x.device)
    delta = torch.zeros_like(x)
    for a in range(rows):
        for b in range(cols):
            flip = torch.rand(n, generator=generator).lt(0.5).to(x.device).view(-1, 1, 1)
            bump = torch.where(flip, base.t(), base).unsqueeze(1)  # [n, 1, tile, tile]
            r0, c0 = top + a * tile, left + b * tile
            delta[:, :, r0 : r0 + tile, c0 : c0 + tile] += bump * _signs((n, c, 1, 1), generator, x)
    return (x + _l2_normalise(delta, eps)).clamp(0, 1)


def _propose_linf(x, x_best, eps, side, generator):
    """Set a random square of the perturbation to ±eps per channel (paper, Alg. 2).

    Where a draw of signs would leave the image unchanged (the window already holds those
    signs, or the pixels sit at a box bound), the signs are redrawn, up to ``_SIGN_DRAWS``
    draws in all; each example takes its first draw that changes it (the last one when none
    does). Whether a draw changes an example is read off two per-channel tables, whether
    +eps and whether -eps change that channel's window, so only the chosen candidate image
    is ever built.
    """
    m, c, h, w = x.shape
    row, col = _positions(m, side, h, w, generator, x.device)
    mask = _window_mask(row, col, side, h, w, x.device)
    signs = _signs((_SIGN_DRAWS, m, c, 1, 1), generator, x)

    def changes(value):  # [m, C]: whether setting the window's channel to ``value`` changes x_best
        return (((value.clamp(0, 1) - x_best).abs() > 1e-7) & mask).flatten(2).any(dim=2)

    plus, minus = changes(x + eps), changes(x - eps)
    changed = torch.where(signs.view(_SIGN_DRAWS, m, c) > 0, plus, minus).any(dim=2)  # [draws, m]
    first = torch.where(changed.any(dim=0), changed.to(torch.uint8).argmax(dim=0), _SIGN_DRAWS - 1)
    chosen = signs[first, torch.arange(m, device=x.device)]  # [m, C, 1, 1]
    return (x + torch.where(mask, eps * chosen, x_best - x)).clamp(0, 1)


def _propose_l2(x, x_best, eps, side, generator):
    """Move the perturbation's mass in two random windows into the first one, add a
    random ±bump there, and keep the total L2 norm at eps (paper, Alg. 3)."""
    m, c, h, w = x.shape
    delta = x_best - x
    row1, col1 = _positions(m, side, h, w, generator, x.device)
    row2, col2 = _positions(m, side, h, w, generator, x.device)
    mask1 = _window_mask(row1, col1, side, h, w, x.device).to(x.dtype)
    mask2 = _window_mask(row2, col2, side, h, w, x.device).to(x.dtype)
    union = torch.maximum(mask1, mask2)

    def channel_norm(t):  # [m, C, 1, 1]
        return t.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()

    unused = (eps**2 - delta.flatten(1).pow(2).sum(dim=1)).clamp_min(0).view(-1, 1, 1, 1)
    mass = (unused / c + channel_norm(delta * union) ** 2).sqrt()
    base = _window_pattern(side, x.dtype).to(x.device)
    flip = torch.rand(m, generator=generator).lt(0.5).to(x.device).view(-1, 1, 1)
    bumps = _place(torch.where(flip, base.t(), base), row1, col1, h, w)  # [m, 1, H, W]
    window = delta * mask1
    window = window / channel_norm(window).clamp_min(_TINY) + bumps * _signs((m, c, 1, 1), generator, x)
    window = window / channel_norm(window).clamp_min(_TINY) * mass
    new_delta = delta * (1 - union) + window * mask1
    return (x + _l2_normalise(new_delta, eps)).clamp(0, 1)


def _square_run(model, x, y, *, eps, norm, budget, queries, p_init, generator):
    """One Square Attack run with at most ``budget`` queries per example.

    Returns ``(x_best, loss, fooled)``; ``loss`` is the CW loss at ``x_best``, minus the margin.
    Every ``cw`` call is one forward pass (one query); the caller runs this under ``torch.no_grad()``.
    """
    geo = geometry(norm)
    x_best = geo.project(_init(x, eps, norm, generator), x, eps)
    loss, scores = cw(model, x_best, y)
    pred = scores.argmax(dim=1)
    propose = _propose_linf if norm == "linf" else _propose_l2
    _, _, h, w = x.shape
    for iteration in range(budget - 1):
        idx = (pred == y).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        side = _side(_p_at(p_init, iteration, queries), h, w, norm)
        candidate = geo.project(propose(x[idx], x_best[idx], eps, side, generator), x[idx], eps)
        new_loss, new_scores = cw(model, candidate, y[idx])
        better = new_loss > loss[idx]  # a lower margin
        keep = idx[better]
        x_best[keep] = candidate[better]
        loss[keep] = new_loss[better]
        pred[keep] = new_scores.argmax(dim=1)[better]
    return x_best, loss, pred != y


def square(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Square Attack (Andriushchenko et al., ECCV 2020), untargeted, margin loss.

    Threat model: score-based black-box; perturbations inside the ``norm`` ball of radius
    ``eps`` around ``x`` intersected with the image box [0, 1]. Only forward passes under
    ``torch.no_grad`` are used.

    L-inf: starts from vertical stripes of ±eps (one random sign per column and channel);
    each iteration sets a random square window of the perturbation to ±eps (one sign per
    channel). L2: starts from a grid of bumps with random signs, rescaled to norm eps; each
    iteration moves the perturbation inside two random windows into the first and adds a
    random ±bump there, keeping the norm at eps. A proposal replaces the current point only
    if it lowers the margin ``s_y - max_{j != y} s_j``; an example stops being queried as
    soon as it is misclassified.

    Args:
        model: ``nn.Module`` mapping [0, 1] images [N, C, H, W] to class scores [N, k], k >= 2.
        x: clean images, float [N, C, H, W] in [0, 1].
        y: true labels, int64 [N].
        eps: radius of the threat model, in pixel units (8/255 = eight grey levels), >= 0.
        norm: ``"linf"`` (default) or ``"l2"``.
        queries: forward passes per example and run (default 5000). It counts every pass
            an example takes part in: in the first run the clean check and the initial
            point, so at most ``queries - 2`` proposals; later runs have ``queries - 1``.
            (AutoAttack's reference code runs one initial query plus ``n_queries``
            proposals, i.e. two more passes than this count.) The window-size schedule
            (p halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of
            10,000) is rescaled to ``queries``.
        p_init: initial fraction of the pixels covered by a window (default 0.8, in (0, 1]).
        restarts: independent runs (default 1), each on the points still correctly
            classified, each with its own ``queries`` budget.
        seed: seed of the attack's own CPU generator (default 0); the global RNG is untouched.

    Returns:
        ``x_adv`` [N, C, H, W] inside the eps-ball ∩ [0, 1]: for correctly classified
        examples, the point with the lowest margin found (misclassified where the attack
        succeeded); ``x`` itself for examples misclassified from the start.
    """
    x, y, geo, eps = check_attack_inputs(x, y, eps, norm, ndim=4)
    if norm not in ("linf", "l2"):
        raise UserError(f"square has no {norm} form in repulsor (its proposals are L-inf and L2 squares): use"
                        " norm \"linf\" or \"l2\", or the l1 standard suite, which runs without it")
    queries = check_int("queries", queries, minimum=1)
    restarts = check_int("restarts", restarts, minimum=1)
    p_init = check_number("p_init", p_init, strict=True, maximum=1.0)
    generator = make_generator(seed)
    result = x.clone()
    if x.shape[0] == 0:
        return result
    with torch.no_grad():
        best_loss, scores = cw(model, x, y)
        require_classes("Square Attack", scores, 2)
        if eps == 0:
            return result
        fooled = scores.argmax(dim=1) != y
        for restart in range(restarts):
            idx = (~fooled).nonzero().squeeze(1)
            budget = queries - 1 if restart == 0 else queries
            if idx.numel() == 0 or budget < 1:
                break
            run_x, run_loss, run_fooled = _square_run(
                model, x[idx], y[idx], eps=eps, norm=norm, budget=budget, queries=queries,
                p_init=p_init, generator=generator,
            )
            keep_worst_case(idx, run_x, run_loss, run_fooled, result, best_loss, fooled)
    return geo.project(result, x, eps)
