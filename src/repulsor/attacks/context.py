"""What every attack shares: the evaluation context, input checks, seeded random starts,
and the one loss-and-input-gradient call.

Attacks never switch the model's mode and never compute parameter gradients; the caller
wraps them in ``with evaluating(model):``. Randomness comes from a CPU ``torch.Generator``
seeded per call, so an attack's result depends on its ``seed`` only, not on the global RNG
or on the device.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from numbers import Integral, Real

import torch
from torch import nn

from ..errors import UserError


@contextmanager
def evaluating(model: nn.Module):
    """Put ``model`` in eval mode with frozen parameters; restore both on exit.

    The train/eval flag of every sub-module and the ``requires_grad`` flag of every
    parameter are saved and restored exactly, also when the body raises, so a model that
    keeps some parts in eval mode on purpose (frozen batch norm) comes back as it was.

    Usage::

        with evaluating(model):
            x_adv = pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10)
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        yield model
    finally:
        # Set the flag directly: module.train(mode) would recurse and overwrite children.
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)


def check_images(x, y) -> None:
    """Check that ``x`` is a float batch [N, ...] in [0, 1] and ``y`` int labels [N]."""
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise UserError(f"x must be a float tensor of images [N, C, H, W]; got {_describe(x)}")
    if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32) or y.shape != x.shape[:1]:
        raise UserError(f"y must be an integer label tensor of shape [{x.shape[0]}]; got {_describe(y)}")
    if x.numel() and not torch.isfinite(x).all():
        raise UserError("inputs contain NaN or infinite values")
    if x.numel():
        low, high = x.min().item(), x.max().item()
        if low < 0 or high > 1:
            raise UserError(
                f"inputs must be images in [0, 1]; got min {low:.4g} max {high:.4g}; "
                "normalisation belongs inside the model"
            )


def check_targets(targets, y) -> torch.Tensor | None:
    """Check target classes: int tensor [N], on y's device, never equal to the true label."""
    if targets is None:
        return None
    if not torch.is_tensor(targets) or targets.dtype not in (torch.int64, torch.int32) or targets.shape != y.shape:
        raise UserError(f"targets must be an integer tensor of shape [{y.shape[0]}]; got {_describe(targets)}")
    targets = targets.to(device=y.device, dtype=torch.int64)
    if (targets == y).any():
        first = int((targets == y).nonzero()[0, 0])
        raise UserError(f"targets must differ from the true labels (example {first} has target = label)")
    return targets


def check_number(name: str, value, *, minimum: float = 0.0, strict: bool = False) -> float:
    """Check a finite real setting (``eps``, ``alpha``...) against its lower bound."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number; got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise UserError(f"{name} must be {relation} {minimum:g}; got {value!r}")
    return float(value)


def check_int(name: str, value, *, minimum: int) -> int:
    """Check an integer setting (``steps``, ``restarts``...) against its lower bound."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise UserError(f"{name} must be an integer; got {value!r}")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}; got {value!r}")
    return int(value)


def make_generator(seed) -> torch.Generator:
    """A CPU generator seeded with ``seed``; every attack draws its randomness from one."""
    seed = check_int("seed", seed, minimum=0)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def random_start(geom, x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """A random start in the eps-ball for every example of ``x`` [N, ...].

    Drawn on the CPU then moved to ``x.device``, so the same seed gives the same start on
    every device. Always drawn for the whole batch, so the random stream (and each
    example's start) does not depend on which examples are still being attacked.
    """
    return geom.random_start(x.detach().cpu(), eps, generator).to(x.device)


def loss_and_grad(model, loss_fn, x_adv: torch.Tensor, y: torch.Tensor, target, need_grad: bool = True):
    """Per-example loss [N], scores [N, k] and the input gradient [N, ...] at ``x_adv``.

    The gradient is taken with ``torch.autograd.grad`` with respect to the input only, so no
    parameter ``.grad`` is created even when parameters require gradients. Returns detached
    tensors; the gradient is None when ``need_grad`` is False (the last iterate).
    """
    if not need_grad:
        with torch.no_grad():
            loss, scores = loss_fn(model, x_adv, y, target)
        return loss.detach(), scores.detach(), None
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, scores = loss_fn(model, x_adv, y, target)
        if not loss.requires_grad:
            raise UserError(
                "the model's scores do not depend on its input through autograd "
                "(is there a torch.no_grad() or .detach() inside forward?)"
            )
        (grad,) = torch.autograd.grad(loss.sum(), x_adv, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x_adv)
    return loss.detach(), scores.detach(), grad.detach()


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"tensor of shape {list(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
