"""Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", ICML 2020), untargeted and targeted.

APGD needs no step size: it starts at ``2 * eps``, adds momentum, and halves the step at
checkpoints when progress stalls, restarting from the best point found so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .context import (
    check_attack_inputs,
    check_int,
    check_number,
    check_targets,
    keep_worst_case,
    loss_and_grad,
    make_generator,
    random_start,
    require_classes,
    scores_no_grad,
    with_eot,
    wrong_classes_by_score,
)
from .losses import dlr_targeted, get_loss

MOMENTUM = 0.75  # the paper's alpha: weight of the new gradient step against the last move

# L1-APGD (Croce & Hein, "Mind the box", ICML 2021) as AutoAttack runs it in its L1 version: three
# stages at 3, 2 and 1 times eps with 30%, 30% and 40% of the steps, each from the best point of the
# one before, projected onto its smaller ball.
L1_STAGES = ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))


def apgd(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    loss="ce",
    steps: int = 100,
    restarts: int = 1,
    rho: float = 0.75,
    seed: int = 0,
    targets: torch.Tensor | None = None,
    return_trace: bool = False,
    eot: int = 1,
):
    """APGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum.

    Threat model: white box, ``norm`` ball of radius ``eps`` around ``x`` intersected with
    the image box [0, 1]. The step size starts at ``2 * eps`` per example and is halved at
    the checkpoints ``ceil(p_j * steps)`` (p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) when fewer than a fraction ``rho`` of
    the steps since the last checkpoint raised the loss, or when the step was not halved
    at the last checkpoint and the best loss has not improved since; after halving, the
    iterate restarts from the best point. An example is frozen at its first misclassifying
    iterate and leaves the batch; the others return their best-loss point.

    L1 (``norm="l1"``) runs L1-APGD (Croce & Hein, "Mind the box", ICML 2021) as AutoAttack's
    L1 version does: sparse steps on an adaptive fraction of the coordinates (starting at the
    start's own sparsity), no momentum, a step of eps that shrinks by 1.5 (down to eps/10) at
    every check, every 4% of the steps, where the best point's sparsity did not fall by 5%
    (else back to eps from the best point), and three stages at 3, 2 and 1 times eps with 30%,
    30% and 40% of the steps, each from the best point of the last; only the last stage's
    successes count. With fewer than 4 steps it runs one stage at eps.

    Args:
        model: ``nn.Module`` (or callable) mapping images [N, C, H, W] in [0, 1] to class
            scores [N, k]. Its mode is not touched: call inside ``with evaluating(model):``.
        x: clean images [N, C, H, W], float, values in [0, 1].
        y: true labels [N], int64.
        eps: radius of the threat ball in pixel units (8/255 for L-inf, 0.5 for L2), >= 0.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"``.
        loss: a name in ``LOSSES`` (default ``"ce"``; ``"dlr"`` for APGD-DLR) or a callable.
        steps: iterations per restart, >= 0 (default 100); costs ``steps + 1`` forward and
            backward passes per example still robust.
        restarts: random starts, >= 1 (default 1); each restart runs only on the examples
            still classified correctly, and the worst case per example is kept.
        rho: fraction of loss increases below which the step is halved, in (0, 1]
            (default 0.75).
        seed: seed of the attack's own CPU generator for the random starts (default 0).
        targets: target classes [N] (int64) for a targeted loss, or None (default).
        return_trace: also return the mean loss over the batch at each iterate of the first
            restart, shape [steps + 1] (frozen examples count with their loss when frozen).
        eot: gradient samples per step, >= 1 (default 1): for a randomised model, loss,
            scores and input gradient are averaged over ``eot`` forward and backward passes
            (Expectation over Transformation); 1 is plain APGD at no extra cost.

    Returns:
        ``x_adv`` [N, C, H, W] on ``x.device``, or ``(x_adv, trace)`` with ``return_trace``.
    """
    x, y, geom, eps = check_attack_inputs(x, y, eps, norm)
    steps = check_int("steps", steps, minimum=0)
    restarts = check_int("restarts", restarts, minimum=1)
    rho = check_number("rho", rho, strict=True, maximum=1.0)
    targets = check_targets(targets, y)
    loss_fn = with_eot(get_loss(loss), eot)
    generator = make_generator(seed)
    n = x.shape[0]
    x_adv = x.clone()
    best_loss = torch.full((n,), float("-inf"), device=x.device)
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    problem = _Problem(model, loss_fn, geom, x, y, targets, eps, steps, rho)
    trace = _apgd_restarts(problem, restarts, generator, (x_adv, best_loss, fooled))
    return (x_adv, trace) if return_trace else x_adv


def apgd_targeted(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_targets: int = 9,
    restarts: int = 1,
    seed: int = 0,
    loss="dlr_targeted",
    eot: int = 1,
) -> torch.Tensor:
    """Targeted APGD (APGD-T, Croce & Hein, ICML 2020): APGD toward each likely wrong class.

    Threat model: as ``apgd``. The targets of each example are its ``n_targets`` highest
    scoring wrong classes at the clean input, tried from the most to the least likely;
    each target's run only attacks the examples still classified correctly. Examples the
    model already misclassifies are returned unchanged. An example never misclassified
    gets the point with the highest targeted loss over all targets (the targeted DLR value
    is comparable across targets: its denominator does not depend on the target).

    Args:
        model: maps images [N, C, H, W] in [0, 1] to class scores [N, k]; mode untouched.
        x: clean images [N, C, H, W] in [0, 1]. y: true labels [N], int64.
        eps: radius of the threat ball in pixel units, >= 0.
        norm: ``"linf"`` (default), ``"l2"`` or ``"l1"`` (L1-APGD, see ``apgd``).
        steps: APGD iterations per target and restart, >= 0 (default 100).
        n_targets: number of target classes per example, >= 1 (default 9); at most k - 1
            are used.
        restarts: random starts per target, >= 1 (default 1).
        seed: seed of the random starts (default 0); every target uses the same starts.
        loss: a targeted loss name or callable (default ``"dlr_targeted"``, which needs
            k >= 4 classes; ``"ce_targeted"`` works for any k >= 2).
        eot: gradient samples per step, >= 1 (default 1): for a randomised model, loss,
            scores and input gradient are averaged over ``eot`` forward and backward passes
            (Expectation over Transformation); 1 is plain APGD-T at no extra cost.

    Returns:
        ``x_adv`` [N, C, H, W] on ``x.device``.
    """
    x, y, geom, eps = check_attack_inputs(x, y, eps, norm)
    steps = check_int("steps", steps, minimum=0)
    n_targets = check_int("n_targets", n_targets, minimum=1)
    restarts = check_int("restarts", restarts, minimum=1)
    loss_fn = get_loss(loss)
    make_generator(seed)  # validates the seed before any work
    with_eot(loss_fn, eot)  # validates eot before any work

    clean = scores_no_grad(model, x, y)
    k = clean.shape[1]
    if loss_fn is dlr_targeted:
        require_classes("targeted DLR loss", clean, 4, "use --loss ce_targeted or cw")
    loss_fn = with_eot(loss_fn, eot)
    require_classes("a targeted attack", clean, 2)
    # Rank the wrong classes by clean score; the true class goes last and is never used.
    ranking = wrong_classes_by_score(clean, y)

    x_adv = x.clone()
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
    fooled = clean.argmax(dim=1) != y
    for i in range(min(n_targets, k - 1)):
        if fooled.all():
            break
        # Each target replays the same random starts, so the runs of the first targets and
        # restarts do not change when more targets or restarts are asked for.
        generator = make_generator(seed)
        problem = _Problem(model, loss_fn, geom, x, y, ranking[:, i], eps, steps, 0.75)
        _apgd_restarts(problem, restarts, generator, (x_adv, best_loss, fooled))
    return x_adv


@dataclass(frozen=True)
class _Problem:
    """What APGD attacks: the model and loss, the threat model, the examples (and their
    targets), and the run's settings."""

    model: object
    loss_fn: object
    geom: object
    x: torch.Tensor
    y: torch.Tensor
    targets: torch.Tensor | None
    eps: float
    steps: int
    rho: float

    def subset(self, index: torch.Tensor) -> "_Problem":
        """The same problem on the examples ``index`` only."""
        return replace(self, x=self.x[index], y=self.y[index],
                       targets=None if self.targets is None else self.targets[index])


def _apgd_restarts(p: _Problem, restarts: int, generator, worst) -> torch.Tensor:
    """APGD restarts on the examples not yet fooled, keeping the worst case per example.

    ``worst`` = ``(x_adv [N, ...], best_loss [N], fooled [N])``, updated in place with
    ``keep_worst_case``. Returns the loss trace of the first restart [steps + 1].
    """
    x_adv, best_loss, fooled = worst
    trace = torch.zeros(p.steps + 1, device=p.x.device)
    run, radius = (_apgd_l1_run, l1_stages(p.steps)[0][0] * p.eps) if p.geom.name == "l1" else (_apgd_run, p.eps)
    for restart in range(restarts):
        # Drawn for every example, so each one's start does not depend on who is still active.
        start = random_start(p.geom, p.x, radius, generator)
        active = (~fooled).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        run_x, run_loss, run_fooled, run_trace = run(p.subset(active), start[active])
        if restart == 0:
            trace = run_trace
        keep_worst_case(active, run_x, run_loss, run_fooled, x_adv, best_loss, fooled)
    return trace


def checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step: ``ceil(p_j * steps)`` for j >= 1."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # The small offset stops 0.22 * 100 = 22.000000000000004 rounding up to 23.
    return sorted({math.ceil(q * steps - 1e-9) for q in p[1:]} - {0})


def _apgd_run(p: _Problem, start: torch.Tensor):
    """One APGD run from ``start``: (x_adv [n, ...], loss [n], fooled [n], trace [steps + 1]).

    ``s`` holds the per-example state of the examples still active, all indexed like
    ``s["idx"]`` (their positions in ``x``); an example leaves it at its first
    misclassifying iterate, which ``out_*`` then keep.
    """
    x, y, eps, steps = p.x, p.y, p.eps, p.steps
    n, device = x.shape[0], x.device
    out_x, out_loss = start.clone(), torch.empty(n, device=device)
    out_fooled = torch.zeros(n, dtype=torch.bool, device=device)
    latest = torch.empty(n, device=device)  # each example's latest loss, for the trace
    trace = torch.empty(steps + 1, device=device)
    marks, last_mark = set(checkpoints(steps)), 0

    loss, scores, grad = loss_and_grad(p.model, p.loss_fn, start, y, p.targets, need_grad=steps > 0)
    s = {
        "idx": torch.arange(n, device=device),
        "x_prev": start, "x_cur": start, "loss_cur": loss, "grad_cur": grad,
        "x_best": start, "loss_best": loss, "grad_best": grad,
        "eta": torch.full((n,), 2 * eps, device=device),
        "increases": torch.zeros(n, device=device),
        "loss_best_at_mark": loss, "halved_at_mark": torch.zeros(n, dtype=torch.bool, device=device),
    }
    for k in range(steps + 1):
        if k > 0:
            loss, scores = _apgd_step(p, s, first=k == 1, need_grad=k < steps)
        latest[s["idx"]] = loss
        trace[k] = latest.mean()
        s = _leave_when_fooled(s, scores, loss, y, (out_x, out_loss, out_fooled))
        if s["idx"].numel() == 0:
            trace[k + 1 :] = trace[k]
            break
        if k in marks and k < steps:
            halve_at_checkpoint(s, p.rho, k - last_mark)
            last_mark = k
    out_x[s["idx"]], out_loss[s["idx"]] = s["x_best"], s["loss_best"]
    return out_x, out_loss, out_fooled, trace


def _leave_when_fooled(s: dict, scores: torch.Tensor, loss: torch.Tensor, y: torch.Tensor, out) -> dict:
    """Freeze the active examples that ``scores`` misclassify at their current iterate: their point, loss
    and success go to ``out`` = (x [n, ...], loss [n], fooled [n]); returns the state of the others."""
    wrong = scores.argmax(dim=1) != y[s["idx"]]
    if not wrong.any():
        return s
    frozen = s["idx"][wrong]
    out_x, out_loss, out_fooled = out
    out_x[frozen], out_loss[frozen], out_fooled[frozen] = s["x_cur"][wrong], loss[wrong], True
    return {key: None if value is None else value[~wrong] for key, value in s.items()}


def _apgd_step(p: _Problem, s: dict, *, first: bool, need_grad: bool):
    """Move the active examples to the next iterate and update their state in place.

    z = P(x_k + eta * direction(grad)); x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))
    with a = MOMENTUM, except for the first step, which is plain (x_1 = z).
    """
    geom, idx = p.geom, s["idx"]
    x_clean = p.x[idx]
    z = geom.project(geom.step(s["x_cur"], s["grad_cur"], s["eta"]), x_clean, p.eps)
    if first:
        x_new = z
    else:
        moved = s["x_cur"] + MOMENTUM * (z - s["x_cur"]) + (1 - MOMENTUM) * (s["x_cur"] - s["x_prev"])
        x_new = geom.project(moved, x_clean, p.eps)
    target = None if p.targets is None else p.targets[idx]
    loss, scores, grad = loss_and_grad(p.model, p.loss_fn, x_new, p.y[idx], target, need_grad=need_grad)
    s["increases"] = s["increases"] + (loss > s["loss_cur"]).float()
    improved = loss > s["loss_best"]
    s["x_best"] = torch.where(_rows(improved, x_new), x_new, s["x_best"])
    s["loss_best"] = torch.where(improved, loss, s["loss_best"])
    if grad is not None:
        s["grad_best"] = torch.where(_rows(improved, grad), grad, s["grad_best"])
    s["x_prev"], s["x_cur"], s["loss_cur"], s["grad_cur"] = s["x_cur"], x_new, loss, grad
    return loss, scores


def halve_at_checkpoint(s, rho, span):
    """At a checkpoint, halve the step where progress stalled and restart there from the best point.

    Condition 1: fewer than ``rho * span`` of the last ``span`` steps raised the loss.
    Condition 2: the step was not halved at the last checkpoint and the best loss did not
    improve since then.
    """
    stalled = s["increases"] < rho * span
    flat = ~s["halved_at_mark"] & (s["loss_best"] <= s["loss_best_at_mark"])
    halve = stalled | flat
    s["eta"] = torch.where(halve, s["eta"] / 2, s["eta"])
    rows = _rows(halve, s["x_cur"])
    s["x_cur"] = torch.where(rows, s["x_best"], s["x_cur"])
    s["x_prev"] = torch.where(rows, s["x_best"], s["x_prev"])  # no momentum across a restart
    s["grad_cur"] = torch.where(rows, s["grad_best"], s["grad_cur"])
    s["loss_cur"] = torch.where(halve, s["loss_best"], s["loss_cur"])
    s["halved_at_mark"], s["loss_best_at_mark"] = halve, s["loss_best"]
    s["increases"] = torch.zeros_like(s["increases"])


def l1_stages(steps: int) -> list[tuple[float, int]]:
    """(radius as a multiple of eps, steps) of each L1-APGD stage: ``L1_STAGES``, the steps
    rounded up as AutoAttack rounds them and the last stage taking the rest; one stage at eps
    when fewer than 4 steps leave the last stage nothing."""
    counts = [math.ceil(share * steps) for _, share in L1_STAGES[:-1]]
    if steps < 4 or steps - sum(counts) < 1:
        return [(1.0, steps)]
    return [(mult, count) for (mult, _), count in zip(L1_STAGES, counts + [steps - sum(counts)])]


def _apgd_l1_run(p: _Problem, start: torch.Tensor):
    """One L1-APGD run from ``start`` (a point within the first stage's ball), stage by stage:
    (x_adv [n, ...], loss [n], fooled [n], trace [steps + 1]) as ``_apgd_run``."""
    stages = l1_stages(p.steps)
    traces, x_from = [], start
    for number, (mult, steps) in enumerate(stages):
        last = number == len(stages) - 1
        x_from = p.geom.project(x_from, p.x, mult * p.eps)
        out_x, out_loss, out_fooled, trace = _l1_stage(p, x_from, mult * p.eps, steps, last)
        traces.append(trace if number == 0 else trace[1:])  # a stage's start is the last one's best point
        x_from = out_x
    return out_x, out_loss, out_fooled, torch.cat(traces)


def _l1_stage(p: _Problem, start: torch.Tensor, eps: float, steps: int, final: bool):
    """L1-APGD at radius ``eps`` for ``steps`` steps from ``start``. Only the ``final`` stage (at the
    threat model's eps) stops an example at its first misclassifying iterate; earlier stages keep
    every example and return each one's best-loss point."""
    x, y, geom = p.x, p.y, p.geom
    n, device = x.shape[0], x.device
    dim = x[0].numel()
    out_x, out_loss = start.clone(), torch.empty(n, device=device)
    out_fooled = torch.zeros(n, dtype=torch.bool, device=device)
    latest = torch.empty(n, device=device)
    trace = torch.empty(steps + 1, device=device)
    period = max(int(0.04 * steps), 1)
    sparsity = (start != x).flatten(1).sum(dim=1).float()
    loss, scores, grad = loss_and_grad(p.model, p.loss_fn, start, y, p.targets, need_grad=steps > 0)
    s = {
        "idx": torch.arange(n, device=device), "x_cur": start, "grad_cur": grad,
        "x_best": start, "loss_best": loss, "grad_best": grad,
        "eta": torch.full((n,), eps, device=device), "density": sparsity / dim / 1.5, "sparsity": sparsity,
    }
    for k in range(steps + 1):
        if k > 0:
            idx = s["idx"]
            x_new = geom.project(geom.step(s["x_cur"], s["grad_cur"], s["eta"], s["density"]), x[idx], eps)
            target = None if p.targets is None else p.targets[idx]
            loss, scores, grad = loss_and_grad(p.model, p.loss_fn, x_new, y[idx], target, need_grad=k < steps)
            improved = loss > s["loss_best"]
            s["x_best"] = torch.where(_rows(improved, x_new), x_new, s["x_best"])
            s["loss_best"] = torch.where(improved, loss, s["loss_best"])
            if grad is not None:
                s["grad_best"] = torch.where(_rows(improved, grad), grad, s["grad_best"])
            s["x_cur"], s["grad_cur"] = x_new, grad
        latest[s["idx"]] = loss
        trace[k] = latest.mean()
        if final:
            s = _leave_when_fooled(s, scores, loss, y, (out_x, out_loss, out_fooled))
            if s["idx"].numel() == 0:
                trace[k + 1 :] = trace[k]
                break
        if k > 0 and k % period == 0 and k < steps:
            _adapt_sparsity(s, x[s["idx"]], eps, dim)
    out_x[s["idx"]], out_loss[s["idx"]] = s["x_best"], s["loss_best"]
    return out_x, out_loss, out_fooled, trace


def _adapt_sparsity(s: dict, x_clean: torch.Tensor, eps: float, dim: int) -> None:
    """L1-APGD's check: the step's density follows the best point's sparsity (divided by 1.5);
    where that sparsity fell by at least 5% since the last check, the step goes back to eps and
    the iterate to the best point, elsewhere the step shrinks by 1.5, never below eps / 10."""
    sparsity = (s["x_best"] != x_clean).flatten(1).sum(dim=1).float()
    reduced = sparsity / s["sparsity"].clamp_min(1) < 0.95
    s["density"] = sparsity / dim / 1.5
    s["eta"] = torch.where(reduced, torch.full_like(s["eta"], eps), s["eta"] / 1.5).clamp(eps / 10, eps)
    s["sparsity"] = sparsity
    rows = _rows(reduced, s["x_cur"])
    s["x_cur"] = torch.where(rows, s["x_best"], s["x_cur"])
    s["grad_cur"] = torch.where(rows, s["grad_best"], s["grad_cur"])


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example mask [n] shaped to broadcast against ``like`` [n, ...]."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))
