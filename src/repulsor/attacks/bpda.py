"""BPDA and transfer: attacking a model whose own gradients are useless.

Athalye, Carlini and Wagner ("Obfuscated gradients give a false sense of security", ICML
2018) call a non-differentiable step inside a model (thresholding, quantisation, JPEG, a
preprocessor run under ``no_grad``) *shattered gradients*. Two answers work for any such
model:

- BPDA, the Backward Pass Differentiable Approximation: run the step as it is forward and
  a differentiable stand-in backward (``bpda``), so every gradient attack goes through it;
- a transfer attack: craft the examples on a differentiable surrogate model and let the
  cascade check them on the defended model, which only has to answer forward passes
  (``transfer``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from .apgd import apgd


class BPDA(nn.Module):
    """``module`` forward, the gradient of ``backward`` (identity by default) backward.

    The output is ``b(x) + (module(x) - b(x)).detach()``: its value is exactly
    ``module(x)``, its input gradient exactly that of ``b(x)``. With the identity, the
    gradient passes through unchanged (the straight-through estimator), which needs an
    output of the input's shape.
    """

    def __init__(self, module: Callable, backward: Callable | None = None):
        super().__init__()
        if not callable(module):
            raise UserError(f"bpda needs the non-differentiable step as a module or function; got {type(module).__name__}")
        if backward is not None and not callable(backward):
            raise UserError(f"bpda's backward must be a differentiable function or None; got {type(backward).__name__}")
        self.step = module
        self.approximation = backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            value = self.step(x)
        if not torch.is_tensor(value):
            raise UserError(f"the step wrapped by bpda must return a tensor; it returned {type(value).__name__}")
        stand_in = x if self.approximation is None else self.approximation(x)
        if stand_in.shape != value.shape:
            what = "the input" if self.approximation is None else "backward(x)"
            raise UserError(f"bpda: the step's output has shape {list(value.shape)} but {what} has shape "
                            f"{list(stand_in.shape)}; pass backward= a differentiable function with the step's "
                            "output shape")
        return stand_in + (value.to(stand_in.dtype) - stand_in).detach()


def bpda(module: Callable, backward: Callable | None = None) -> BPDA:
    """Wrap a non-differentiable step so that gradient attacks see through it.

    Args:
        module: the step (an ``nn.Module`` or a function of a tensor), run as it is.
        backward: a differentiable function whose input gradient stands in for the step's
            (e.g. a smooth sigmoid for a threshold); None (default) for the identity, the
            straight-through estimator, which needs ``module`` to keep the input's shape.

    Returns:
        An ``nn.Module`` whose output equals ``module(x)`` exactly. Build the defended model
        with it, e.g. ``nn.Sequential(bpda(threshold), classifier)``, and evaluate that:
        predictions are the defence's own; only the gradients are approximated.
    """
    return BPDA(module, backward)


def transfer(model, x: torch.Tensor, y: torch.Tensor, *, surrogate, via: Callable = apgd, seed: int = 0,
             **settings) -> torch.Tensor:
    """Adversarial examples crafted on ``surrogate`` (white box), for ``model`` (black box).

    Args:
        model: the model under attack; not used here: the caller (the cascade) checks the
            examples on it with forward passes only, so it needs no gradients at all.
        x: clean images [N, C, H, W] in [0, 1]; y: labels [N].
        surrogate: a differentiable model mapping the same images to scores over the same
            classes (e.g. the defended classifier without its non-differentiable step).
        via: the white-box attack run on the surrogate (default ``apgd``).
        seed: seed of that attack.
        settings: that attack's other settings (``eps``, ``norm``, ``steps``, ``loss``...).

    Returns:
        ``x_adv`` [N, C, H, W], inside the threat model of ``settings``.
    """
    del model  # black box: the cascade checks the examples on it
    if surrogate is None:
        raise UserError("a transfer attack needs a surrogate model: evaluate(..., surrogate=model) or"
                        " repulsor evaluate RUN --surrogate OTHER_RUN")
    if via is transfer or not callable(via):
        raise UserError("transfer needs a white-box attack function to run on the surrogate (e.g. repulsor.attacks.pgd)")
    return via(surrogate, x, y, seed=seed, **settings)
