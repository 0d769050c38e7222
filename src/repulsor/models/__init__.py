"""Model bodies, the registry that builds them, and the heads that make classifiers of them.

A body maps normalised images [N, C, H, W] to [N, out_dim]. ``build_model`` puts the
normalisation in front and, for prototype methods, the prototype head behind.
"""

from __future__ import annotations

import math
import numbers

from torch import nn

from ..errors import UserError
from .fast import FastCIFAR, fast_cifar
from .heads import DISTANCES, Network, Normalize, PrototypeClassifier, build_model
from .pcl import PCLClassifier
from .resnet import preact_resnet18, resnet18
from .small import mlp, small_cnn
from .wideresnet import wrn

MODELS = {
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "wrn": wrn,
    "small_cnn": small_cnn,
    "mlp": mlp,
    "fast_cifar": fast_cifar,
}


def _positive_int(value, what: str, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise UserError(f"model {name}: {what} must be an integer >= 1, got {value!r}")
    return int(value)


def build_body(name: str, *, in_channels: int, out_dim: int, width: float = 1.0,
               depth: int | None = None, widen_factor: int | None = None,
               input_size: tuple[int, int] | None = None) -> nn.Module:
    """Build a body by name.

    Args:
        name: one of ``MODELS`` (resnet18, preact_resnet18, wrn, small_cnn, mlp, fast_cifar).
        in_channels: image channels C.
        out_dim: output size (k for a linear head, D for prototypes).
        width: channel multiplier (> 0); counts are rounded and kept >= 4. Small values such
            as 0.125 give tiny variants for tests.
        depth: WRN depth (6n + 4, default 34); ignored by the other bodies.
        widen_factor: WRN widening (default 10); ignored by the other bodies.
        input_size: (H, W) of the images; needed by ``mlp`` only (default (8, 8)).

    Returns:
        ``nn.Module`` mapping normalised images [N, C, H, W] to [N, out_dim].
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")
    in_channels = _positive_int(in_channels, "in_channels", name)
    out_dim = _positive_int(out_dim, "out_dim", name)
    if (not isinstance(width, numbers.Real) or isinstance(width, bool)
            or not math.isfinite(float(width)) or width <= 0):
        raise UserError(f"model {name}: width must be a number > 0, got {width!r}")
    width = float(width)
    if name == "wrn":
        return wrn(in_channels=in_channels, out_dim=out_dim, width=width, depth=depth,
                   widen_factor=widen_factor)
    if name == "mlp":
        if input_size is not None:
            input_size = tuple(_positive_int(s, "input_size", name) for s in input_size)
        return mlp(in_channels=in_channels, out_dim=out_dim, width=width, input_size=input_size)
    return MODELS[name](in_channels=in_channels, out_dim=out_dim, width=width)


__all__ = [
    "DISTANCES", "FastCIFAR", "MODELS", "Network", "Normalize", "PCLClassifier", "PrototypeClassifier", "build_body", "build_model",
    "fast_cifar", "fit_to_data", "mlp", "preact_resnet18", "resnet18", "small_cnn", "wrn",
]


def fit_to_data(model: nn.Module, x) -> bool:
    """Fit the data-dependent layers of a fresh model (fast_cifar's patch whitening) to training
    images ``x`` in [0, 1]; returns whether there were any. Every ``Network`` inside ``model``
    normalises the first ``body.fit_samples`` images as its forward pass would."""
    import torch

    fitted = False
    for network in (m for m in model.modules() if isinstance(m, Network)):
        if hasattr(network.body, "fit"):
            device = next(network.parameters()).device
            with torch.no_grad():
                network.body.fit(network.normalize(x[: network.body.fit_samples].to(device).float()))
            fitted = True
    return fitted
