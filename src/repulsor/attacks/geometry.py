"""The geometry of each threat model, written once.

Every attack and every adversarial-training method asks its norm for three things:
a random start inside the eps-ball, a steepest-ascent step of a given length, and a
projection back onto the eps-ball intersected with the image box [0, 1]. The attack
loops never ask which norm they are in.

All tensors are images in pixel space, shape [N, C, H, W], values in [0, 1]; ``eps``
and ``alpha`` are in the same units (8/255 means eight grey levels). Both may be a
float or a per-example tensor of shape [N] (APGD uses per-example step sizes).

Each geometry also knows its largest meaningful radius (``max_eps``): the diameter of the
image box in its norm (1 in L-inf, sqrt(D) in L2, D in L1 for D = C*H*W coordinates), so that
the eps check is one per norm (8 means 8/255 in L-inf, but 8 is a customary L1 budget).
"""

from __future__ import annotations

import torch

from ..errors import UserError

_TINY = 1e-12


def _per_example(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a [N] tensor to shape [N, 1, 1, ...] matching ``like``; a tensor of
    ``like``'s shape (an L-inf radius per coordinate, PGD only) is used as it is."""
    if not torch.is_tensor(value):
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.shape == like.shape and like.dim() > 1:
        return value.to(device=like.device, dtype=like.dtype)
    return value.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class Linf:
    """L-infinity ball: uniform random start, sign-gradient step, coordinate clipping."""

    name = "linf"
    typical = "8/255"  # the customary CIFAR-10 budget, for error messages

    def max_eps(self, dim: int | None = None) -> float:
        """The box's diameter in this norm: 1 (any pixel can go anywhere)."""
        return 1.0

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example L-inf norm, shape [N]."""
        return delta.flatten(1).abs().amax(dim=1)

    def random_start(self, x: torch.Tensor, eps, generator: torch.Generator | None = None) -> torch.Tensor:
        """A point drawn uniformly from the eps-ball around ``x``, clipped to [0, 1]."""
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return (x + (2 * noise - 1) * _per_example(eps, x)).clamp(0, 1)

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit-norm steepest-ascent direction for this norm: sign(grad)."""
        return grad.sign()

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha) -> torch.Tensor:
        """One steepest-ascent step of L-inf length ``alpha`` (not yet projected)."""
        return x_adv + _per_example(alpha, x_adv) * self.direction(grad)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps) -> torch.Tensor:
        """Closest point to ``x_adv`` in the eps-ball around ``x`` and in [0, 1]."""
        eps_t = _per_example(eps, x)
        return torch.min(torch.max(x_adv, x - eps_t), x + eps_t).clamp(0, 1)


class L2:
    """L2 ball: random start uniform in the ball, normalised-gradient step, radial projection."""

    name = "l2"
    typical = "0.5"

    def max_eps(self, dim: int | None = None) -> float:
        """The box's diameter in this norm, sqrt(D) (unbounded when ``dim`` is not known)."""
        return float("inf") if dim is None else dim ** 0.5

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example L2 norm, shape [N]."""
        return delta.flatten(1).norm(dim=1)

    def random_start(self, x: torch.Tensor, eps, generator: torch.Generator | None = None) -> torch.Tensor:
        """A point drawn uniformly from the eps-ball around ``x``, clipped to [0, 1]."""
        n = x.shape[0]
        direction = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        direction = direction / (_per_example(self.norm(direction), x) + _TINY)
        # Uniform in the ball: radius distributed as U^(1/d).
        dim = x[0].numel()
        radius = torch.rand(n, generator=generator, dtype=x.dtype).to(x.device) ** (1.0 / dim)
        delta = direction * _per_example(radius, x) * _per_example(eps, x)
        return self.project(x + delta, x, eps)

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit-norm steepest-ascent direction for this norm: grad / ||grad||_2."""
        return grad / (_per_example(self.norm(grad), grad) + _TINY)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha) -> torch.Tensor:
        """One steepest-ascent step of L2 length ``alpha`` (not yet projected)."""
        return x_adv + _per_example(alpha, x_adv) * self.direction(grad)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps) -> torch.Tensor:
        """Radial projection onto the eps-ball around ``x``, then clipping to [0, 1].

        Clipping after the radial projection can only shrink the perturbation, so the
        result stays inside both sets.
        """
        delta = x_adv - x
        scale = torch.clamp(_per_example(eps, x) / (_per_example(self.norm(delta), x) + _TINY), max=1.0)
        return (x + delta * scale).clamp(0, 1)


class L1:
    """L1 ball: the sparse steepest-ascent step and the exact projection onto ball and box.

    The steepest-ascent direction of the L1 norm moves one coordinate only; a step on the
    ``density`` fraction of coordinates with the largest gradient magnitudes (each by
    sign(grad) / their count, so the direction has unit L1 norm) is the sparse step of
    L1-APGD (Croce & Hein, "Mind the box", ICML 2021), which adapts ``density`` per example;
    PGD keeps ``DENSITY``. The projection is exact for the intersection of the L1 ball with
    the image box, not a ball projection followed by clipping (which can leave the ball's
    budget unspent or, done the other way round, the box).
    """

    name = "l1"
    typical = "12"  # the customary CIFAR-10 L1 budget (10 on MNIST)
    # PGD's fraction of coordinates per step: L1-APGD's starting density (Croce & Hein 2021). SLIDE's 1%
    # (Tramer & Boneh 2019) moved one pixel per step on small images and left most points unbroken.
    DENSITY = 0.2

    def max_eps(self, dim: int | None = None) -> float:
        """The box's diameter in this norm, D (unbounded when ``dim`` is not known)."""
        return float("inf") if dim is None else float(dim)

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example L1 norm, shape [N]."""
        return delta.flatten(1).abs().sum(dim=1)

    def random_start(self, x: torch.Tensor, eps, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian noise around ``x`` projected onto the eps-ball and the box (as AutoAttack's
        L1-APGD starts): a point on the ball's surface, sparse where the box binds."""
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return self.project(x + noise, x, eps)

    def direction(self, grad: torch.Tensor, density=None) -> torch.Tensor:
        """sign(grad) on the ``density`` fraction of coordinates with the largest |grad| (at least
        one; a float or a per-example tensor [N]), divided by their count: unit L1 norm."""
        flat = grad.flatten(1).abs()
        dim = flat.shape[1]
        density = self.DENSITY if density is None else density
        keep = torch.as_tensor(density, dtype=torch.float64).to(grad.device).expand(flat.shape[0])
        # the threshold is the value at sorted position (1 - density) * D, as L1-APGD takes it (rounded, so
        # that a density of 0.2 in float32 moves 20 of 100 coordinates, not 21)
        position = ((1 - keep) * dim).round().clamp(0, dim - 1).long()
        threshold = flat.sort(dim=1).values.gather(1, position.unsqueeze(1))
        chosen = (flat >= threshold) & (flat > 0)
        signs = grad.flatten(1).sign() * chosen
        count = chosen.sum(dim=1, keepdim=True).clamp_min(1)
        return (signs / count).reshape(grad.shape)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, alpha, density=None) -> torch.Tensor:
        """One sparse steepest-ascent step of L1 length ``alpha`` (not yet projected)."""
        return x_adv + _per_example(alpha, x_adv) * self.direction(grad, density)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps) -> torch.Tensor:
        """The closest point (in L2) to ``x_adv`` in the eps-ball around ``x`` intersected with [0, 1].

        With v = x_adv - x and u_i the room to the box in the direction of v_i, the solution is
        d_i = sign(v_i) * min(max(|v_i| - lam, 0), u_i), with lam = 0 when that already spends at
        most eps, else the lam >= 0 at which ||d||_1 = eps. ||d(lam)||_1 is piecewise linear and
        nonincreasing in lam, with a kink where each coordinate starts (|v_i| - u_i) and stops
        (|v_i|) shrinking; sorting the kinks gives it at each of them, and the segment holding eps
        is solved in closed form.
        """
        shape, dtype = x_adv.shape, x_adv.dtype
        # in float64: the budget spent is a running sum over every coordinate
        v = (x_adv.double() - x.double()).flatten(1)
        xf = x.flatten(1).double()
        room = torch.where(v >= 0, 1 - xf, xf).clamp_min(0)
        size = v.abs()
        eps_t = torch.as_tensor(eps, dtype=v.dtype).to(v.device).reshape(-1, 1).expand(v.shape[0], 1)
        clipped = torch.minimum(size, room)
        total = clipped.sum(dim=1, keepdim=True)
        inside = total <= eps_t
        starts = (size - room).clamp_min(0)
        kinks = torch.cat([starts, size], dim=1)
        change = torch.cat([torch.ones_like(size), -torch.ones_like(size)], dim=1)
        kinks, order = kinks.sort(dim=1)
        shrinking = change.gather(1, order).cumsum(dim=1)  # coordinates shrinking just after each kink
        widths = torch.diff(kinks, dim=1, prepend=torch.zeros_like(kinks[:, :1]))
        before = torch.cat([torch.zeros_like(shrinking[:, :1]), shrinking[:, :-1]], dim=1)
        spent = total - (before * widths).cumsum(dim=1)  # ||d||_1 at each kink, nonincreasing
        k = (spent > eps_t).sum(dim=1, keepdim=True).clamp(max=kinks.shape[1] - 1)  # first kink at or below eps
        last = (k - 1).clamp_min(0)
        lam_prev = torch.where(k > 0, kinks.gather(1, last), torch.zeros_like(eps_t))
        spent_prev = torch.where(k > 0, spent.gather(1, last), total)
        slope = shrinking.gather(1, last).clamp_min(1)
        lam = torch.where(k > 0, lam_prev + (spent_prev - eps_t) / slope, torch.zeros_like(eps_t))
        lam = torch.where(inside, torch.zeros_like(lam), lam)
        d = v.sign() * torch.minimum((size - lam).clamp_min(0), room)
        return (xf + d).clamp(0, 1).to(dtype).reshape(shape)


GEOMETRIES = {"linf": Linf(), "l2": L2(), "l1": L1()}


def geometry(norm: str):
    """Return the geometry object for ``norm`` ("linf", "l2" or "l1")."""
    try:
        return GEOMETRIES[norm]
    except KeyError:
        raise UserError(f"unknown norm {norm!r}: choose one of {sorted(GEOMETRIES)}") from None


def check_eps(eps: float, norm: str, dim: int | None = None, *, what: str = "eps") -> float:
    """``eps`` if it is a radius the threat model ``norm`` can mean, else one line naming the fix.

    Every norm: a finite number >= 0. L-inf: at most 1 (images are in [0, 1]; 8 grey levels are
    8/255). L2 and L1: at most the box's diameter in that norm when the image size ``dim`` is
    known (sqrt(D), D), beyond which a larger radius changes nothing.
    """
    geom = geometry(norm)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps == eps or eps < 0 or eps == float("inf"):
        raise UserError(f"{what} = {eps!r} is not a radius: give a finite number >= 0, e.g. {geom.typical} for {norm}")
    limit = geom.max_eps(dim)
    if eps > limit:
        if norm == "linf":
            raise UserError(f"{what} = {eps:g} is larger than 1: linf perturbations are in [0, 1] pixel units; for"
                            f" {eps:g} grey levels write \"{eps:g}/255\" (= {eps / 255:.4f})")
        raise UserError(f"{what} = {eps:g} exceeds the diameter of the image box in {norm} ({limit:g} for {dim} "
                        f"coordinates): give a radius in [0, {limit:g}], e.g. {geom.typical}")
    return float(eps)
