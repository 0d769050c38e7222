"""One bound rule per layer type: interval propagation (IBP) and the backward linear relaxation
(CROWN), side by side, for the sequential networks repulsor builds.

A layer's rule answers two questions:

- ``interval(layer, lower, upper)``: bounds of the layer's output over the box [lower, upper] of
  its input (IBP, Gowal et al. 2018).
- ``backward(layer, lam, bias, lower, upper)``: given a linear function ``lam . out + bias`` of the
  layer's output (``lam`` [B, m, *out_shape], ``bias`` [B, m]), a linear function of the layer's
  input that is a *lower* bound of it over the input box [lower, upper] (CROWN, Zhang et al. 2018).

Affine layers (Linear, Conv2d, batch norm in eval mode, average pooling, flatten, ``Normalize``)
share one rule: their linear part's transpose is a vector-Jacobian product, so no layer needs its
own transpose written by hand. ReLU and max pooling are relaxed; anything else is refused by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.heads import Normalize

AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
          Normalize, nn.Identity, nn.Dropout)
MONOTONE = (nn.ReLU, nn.MaxPool2d)
SUPPORTED = AFFINE + MONOTONE


def check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, SUPPORTED):
        names = ", ".join(sorted({t.__name__ for t in SUPPORTED}))
        raise UserError(f"certified bounds do not cover the layer {type(layer).__name__} ({layer!r}); they cover {names}")


def _affine_parts(layer: nn.Module, like: torch.Tensor):
    """``(linear, offset)``: the layer as ``x -> linear(x) + offset`` (offset: the output at 0)."""
    zero = torch.zeros_like(like[:1])
    with torch.no_grad():
        offset = layer(zero)[0]
    return (lambda x: layer(x) - offset), offset


# ---------------------------------------------------------------- IBP


def interval(layer: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    """Bounds [N, *out] of the layer's output over the box [lower, upper] [N, *in]; differentiable in
    the layer's weights (certified training takes their gradient)."""
    check_layer(layer)
    if isinstance(layer, MONOTONE):
        return layer(lower), layer(upper)
    mid, rad = (upper + lower) / 2, (upper - lower) / 2
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.training:
        return _batch_norm_in_training(layer, mid, rad)
    centre = layer(mid)
    spread = _abs_linear(layer, rad)
    return centre - spread, centre + spread


def _abs_linear(layer: nn.Module, rad: torch.Tensor) -> torch.Tensor:
    """``|A| rad`` for the layer's linear part A (rad >= 0)."""
    if isinstance(layer, nn.Linear):
        return F.linear(rad, layer.weight.abs())
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(rad, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale = _bn_scale(layer)
        shape = (1, -1) + (1,) * (rad.dim() - 2)
        return rad * scale.abs().view(shape)
    if isinstance(layer, Normalize):
        return rad / layer.std
    # Average pooling, flatten, identity, dropout in eval mode: non-negative weights.
    return layer(rad)


def _batch_norm_in_training(layer: nn.Module, mid: torch.Tensor, rad: torch.Tensor):
    """Certified training (IBP) through batch norm in training mode: the box is normalised by the
    statistics of its centres over the batch, as the forward pass normalises the batch (Gowal et al.
    2018; CROWN-IBP does the same), and the running statistics are left alone. These are bounds of the
    training-mode function, for a training loss only: certificates need eval mode (``_bn_scale``)."""
    dims = [0] + list(range(2, mid.dim()))
    shape = (1, -1) + (1,) * (mid.dim() - 2)
    mean, var = mid.mean(dims), mid.var(dims, unbiased=False)
    scale = (layer.weight if layer.affine else torch.ones_like(mean)) / torch.sqrt(var + layer.eps)
    shift = (layer.bias if layer.affine else torch.zeros_like(mean)) - mean * scale
    centre = mid * scale.view(shape) + shift.view(shape)
    spread = rad * scale.abs().view(shape)
    return centre - spread, centre + spread


def _bn_scale(layer) -> torch.Tensor:
    if layer.training:
        raise UserError("certified bounds need batch norm in eval mode: call model.eval() first")
    weight = layer.weight if layer.affine else torch.ones_like(layer.running_var)
    return weight / torch.sqrt(layer.running_var + layer.eps)


# ---------------------------------------------------------------- CROWN


def backward(layer: nn.Module, lam: torch.Tensor, bias: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    """Pass the lower-bounding linear function ``lam . out + bias`` back through ``layer``.

    Args:
        lam: [B, m, *out_shape]; bias: [B, m]; lower, upper: bounds of the layer's input [B, *in_shape].

    Returns:
        ``(lam_in [B, m, *in_shape], bias_in [B, m])`` with ``lam_in . x + bias_in <= lam . layer(x) + bias``
        for every x in the box.
    """
    check_layer(layer)
    if isinstance(layer, nn.ReLU):
        return _relu_backward(lam, bias, lower, upper)
    if isinstance(layer, nn.MaxPool2d):
        return _maxpool_backward(layer, lam, bias, lower, upper)
    return _affine_backward(layer, lam, bias, lower)


def _affine_backward(layer, lam, bias, lower):
    b, m = lam.shape[:2]
    x = torch.zeros((b * m, *lower.shape[1:]), dtype=lam.dtype, device=lam.device, requires_grad=True)
    with torch.enable_grad():
        linear, offset = _affine_parts(layer, x)
        out = linear(x)
        (lam_in,) = torch.autograd.grad(out, x, grad_outputs=lam.reshape(b * m, *out.shape[1:]))
    bias_in = bias + (lam * offset).flatten(2).sum(2)
    return lam_in.reshape(b, m, *lower.shape[1:]), bias_in


def _relu_backward(lam, bias, lower, upper):
    """CROWN's ReLU relaxation: upper line through (l, 0) and (u, u) for unstable neurons, lower line
    alpha * x with alpha = 1 where u > -l (else 0); positive coefficients take the lower line."""
    l, u = lower.unsqueeze(1), upper.unsqueeze(1)
    active, inactive = l >= 0, u <= 0
    unstable = ~(active | inactive)
    slope_up = torch.where(unstable, u / (u - l).clamp_min(1e-12), active.to(u.dtype))
    shift_up = torch.where(unstable, -slope_up * l, torch.zeros_like(l))
    slope_low = torch.where(unstable, (u > -l).to(u.dtype), active.to(u.dtype))
    pos, neg = lam.clamp_min(0), lam.clamp_max(0)
    lam_in = pos * slope_low + neg * slope_up
    bias_in = bias + (neg * shift_up).flatten(2).sum(2)
    return lam_in, bias_in


def _maxpool_backward(layer, lam, bias, lower, upper):
    """Max pooling relaxed soundly: below, the window's element with the largest lower bound;
    above, the constant largest upper bound of the window."""
    b, m = lam.shape[:2]
    _, index = F.max_pool2d(lower, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode,
                            return_indices=True)
    top = F.max_pool2d(upper, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
    pos, neg = lam.clamp_min(0), lam.clamp_max(0)
    flat_in = torch.zeros((b, m, *lower.shape[1:]), dtype=lam.dtype, device=lam.device).flatten(3)
    idx = index.unsqueeze(1).expand(b, m, *index.shape[1:]).flatten(3)
    flat_in.scatter_add_(3, idx, pos.flatten(3))
    bias_in = bias + (neg * top.unsqueeze(1)).flatten(2).sum(2)
    return flat_in.reshape(b, m, *lower.shape[1:]), bias_in


def concretize(lam: torch.Tensor, bias: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The minimum of ``lam . x + bias`` over the box [lower, upper]: [B, m]."""
    mid, rad = ((upper + lower) / 2).unsqueeze(1), ((upper - lower) / 2).unsqueeze(1)
    return bias + (lam * mid).flatten(2).sum(2) - (lam.abs() * rad).flatten(2).sum(2)
