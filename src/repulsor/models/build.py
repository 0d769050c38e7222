"""Building models: the body registry, the classifier around a body, and the classifier a
training method needs, and fitting data-dependent layers to the training data.

A body maps normalised images [N, C, H, W] to [N, out_dim]. ``build_model`` puts the
normalisation in front and, for prototype methods, the prototype head behind.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..data import DATASETS
from ..errors import UserError
from ..prototypes import check_prototypes
from .fast import OUTPUT_SCALE, fast_cifar
from .heads import DISTANCES, Network, Normalize, PrototypeClassifier
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
               input_size: tuple[int, int] | None = None, centre_features: bool = True,
               whiten_directions: int = 0, output_scale: float | None = None) -> nn.Module:
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
        centre_features: ``fast_cifar`` only: the batch norm over its pooled features (default on;
            off is the published network).
        whiten_directions: ``fast_cifar`` only: how many of the largest patch-covariance directions
            its whitening keeps (0, the default and the published network: all ``C * 4``).
        output_scale: ``fast_cifar`` only: the factor on its output (None: the published 1/9).

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
    if name == "fast_cifar":
        directions = in_channels * 4  # a 2x2 patch of C channels
        if (not isinstance(whiten_directions, numbers.Integral) or isinstance(whiten_directions, bool)
                or not 0 <= whiten_directions <= directions):
            raise UserError(f"model {name}: whiten_directions must be an integer from 0 (all) to {directions},"
                            f" got {whiten_directions!r}")
        extra = {} if output_scale is None else {"output_scale": float(output_scale)}
        return fast_cifar(in_channels=in_channels, out_dim=out_dim, width=width, centre_features=centre_features,
                          whiten_directions=whiten_directions, **extra)
    return MODELS[name](in_channels=in_channels, out_dim=out_dim, width=width)


def body_kwargs(model_cfg, info, out_dim: int) -> dict:
    """The keyword arguments that ``build_body(model_cfg.name, ...)`` needs for ``model_cfg``, and no
    others: ``build_model`` builds with them and ``export`` writes them into a standalone model file,
    so the two cannot disagree about a body's settings."""
    name = getattr(model_cfg, "name", None)
    channels, height, wide = (int(s) for s in info.shape)
    kwargs = {"in_channels": channels, "out_dim": int(out_dim), "width": getattr(model_cfg, "width", 1.0)}
    if name == "wrn":
        kwargs.update(depth=getattr(model_cfg, "depth", None), widen_factor=getattr(model_cfg, "widen_factor", None))
    elif name == "mlp":
        kwargs["input_size"] = [height, wide]
    elif name == "fast_cifar":
        if not getattr(model_cfg, "centre_features", True):
            kwargs["centre_features"] = False
        if getattr(model_cfg, "whiten_directions", 0):
            kwargs["whiten_directions"] = int(model_cfg.whiten_directions)
        if getattr(model_cfg, "output_scale", OUTPUT_SCALE) != OUTPUT_SCALE:
            kwargs["output_scale"] = float(model_cfg.output_scale)
    return kwargs


def build_model(model_cfg, info, prototypes: torch.Tensor | None = None,
                distance: str | None = None, pcl: bool = False) -> nn.Module:
    """Build the classifier a config asks for.

    Args:
        model_cfg: any object with ``name`` and optionally ``width`` (default 1.0), ``depth``,
            ``widen_factor`` (used by ``wrn`` only).
        info: a DatasetInfo-like object with ``num_classes``, ``shape`` (C, H, W), ``mean``,
            ``std``.
        prototypes: [k, D] or None. None builds a ``Network`` with k outputs (a linear head);
            a tensor builds a ``PrototypeClassifier`` whose body outputs D values.
        distance: the prototype distance (required with prototypes); None or ``"linear"``
            without them.
        pcl: wrap the linear-head network in a ``PCLClassifier`` (auxiliary projections and
            learned centres for the prototype conformity loss); needs ``prototypes=None``.

    Returns:
        An ``nn.Module`` mapping [0, 1] images [N, C, H, W] to scores [N, k].
    """
    k = int(info.num_classes)

    if prototypes is None:
        if distance not in (None, "linear"):
            raise UserError(f"prototype distance {distance!r} needs prototypes; pass them or use a linear head")
        out_dim = k
    else:
        if distance is None or distance == "linear":
            raise UserError(f"prototypes need a distance, one of {', '.join(DISTANCES)}; got {distance!r}")
        if prototypes.dim() != 2:
            raise UserError(f"prototypes must be a [k, D] tensor, got shape {tuple(prototypes.shape)}")
        check_prototypes(prototypes, k, prototypes.shape[1], path=f"the prototypes for {_info_name(info)}")
        out_dim = int(prototypes.shape[1])

    body = build_body(getattr(model_cfg, "name", None), **body_kwargs(model_cfg, info, out_dim))
    network = Network(input_normalization(model_cfg, info), body)
    if pcl:
        if prototypes is not None:
            raise UserError("pcl learns its own centres on a linear-head network; do not pass prototypes")
        return PCLClassifier(network, k, tuple(int(s) for s in info.shape))
    if prototypes is None:
        return network
    return PrototypeClassifier(network, prototypes, distance)


def input_normalization(model_cfg, info) -> Normalize:
    """The model's first layer: the data set's mean/std, or (``model.normalize = false``, as the
    authors' code trained) the identity, mean 0 and std 1, so the body sees raw [0, 1] pixels."""
    if getattr(model_cfg, "normalize", True):
        return Normalize(info.mean, info.std)
    channels = int(info.shape[0])
    return Normalize([0.0] * channels, [1.0] * channels)


def _info_name(info) -> str:
    return str(getattr(info, "name", "the data set"))


def fit_to_data(model: nn.Module, x) -> bool:
    """Fit the data-dependent layers of a fresh model (fast_cifar's patch whitening) to training
    images ``x`` in [0, 1]; returns whether there were any. Every ``Network`` inside ``model``
    normalises the first ``body.fit_samples`` images as its forward pass would."""
    fitted = False
    for network in (m for m in model.modules() if isinstance(m, Network)):
        if hasattr(network.body, "fit"):
            device = next(network.parameters()).device
            with torch.no_grad():
                network.body.fit(network.normalize(x[: network.body.fit_samples].to(device).float()))
            fitted = True
    return fitted


def head_distance(cfg, method) -> str | None:
    """The distance of a prototype head for ``method`` under the run config ``cfg`` (None for
    heads without prototypes): the method's own, else ``prototypes.distance``."""
    return (method.distance or cfg.prototypes.distance) if method.uses_prototypes else None


def build_for_method(cfg, method, prototypes=None) -> nn.Module:
    """The untrained classifier that ``method`` (a ``repulsor.methods.Method``) trains under the
    run config ``cfg``: the body, and the head, distance and wrapper the method needs."""
    return build_model(cfg.model, DATASETS[cfg.data.name], prototypes=prototypes, distance=head_distance(cfg, method),
                       pcl=method.head == "pcl")
