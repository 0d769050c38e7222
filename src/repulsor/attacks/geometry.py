"""The geometry of each threat model, written once.

Every attack and every adversarial-training method asks its norm for three things:
a random start inside the eps-ball, a steepest-ascent step of a given length, and a
projection back onto the eps-ball intersected with the image box [0, 1]. The attack
loops never ask which norm they are in.

All tensors are images in pixel space, shape [N, C, H, W], values in [0, 1]; ``eps``
and ``alpha`` are in the same units (8/255 means eight grey levels). Both may be a
float or a per-example tensor of shape [N] (APGD uses per-example step sizes).
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


GEOMETRIES = {"linf": Linf(), "l2": L2()}


def geometry(norm: str):
    """Return the geometry object for ``norm`` ("linf" or "l2")."""
    try:
        return GEOMETRIES[norm]
    except KeyError:
        raise UserError(f"unknown norm {norm!r}: choose one of {sorted(GEOMETRIES)}") from None
