"""Certified lower bounds on robust accuracy: the other side of every attacked upper bound.

``certify(model, x, y, eps=..., norm=..., method="ibp" | "crown-ibp" | "crown")`` proves, for each point, that no
input in the threat model (the eps-ball intersected with the image box [0, 1]) changes its class:
a point is certified when the lower bound of every margin (the true class's score minus another
class's) is positive over the whole set. The bounds are sound, so the certified accuracy is a lower
bound of the robust accuracy, as every attack's result is an upper bound of it.

Networks: ``Network`` (our ``Normalize`` then a body) whose body lists its layers (``layers()``, or
an ``nn.Sequential``) of Linear, Conv2d, ReLU, batch norm in eval mode, average and max pooling
(adaptive average included) and flatten; heads whose decision is linear in the embedding: a linear
layer (logits), and prototype heads with the cosine rule (its argmax is that of the dot product with
the normalised prototypes) or the authors' dot-product rules. Anything else is refused by name.

``ibp`` propagates intervals (Gowal et al. 2018); ``crown`` propagates linear bounds backward
(Zhang et al. 2018), computing every ReLU's and max pool's input bounds by CROWN too and keeping,
for every neuron and margin, the tighter of its CROWN and IBP bound, so it never certifies fewer
points than ``ibp``. ``crown-ibp`` (Zhang et al. 2020) is CROWN on the margins over IBP's bounds of
every intermediate layer: one backward pass of k - 1 rows instead of one per neuron, so it costs
little more than IBP on a convolutional network, where full CROWN's cost grows with the square of the
neurons; it too keeps the tighter of its bound and IBP's per margin. L2 and L1 balls are bounded by the box around them (sound, looser than a
norm-specific relaxation).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..attacks import evaluating
from ..attacks.geometry import check_eps
from ..errors import UserError
from ..evaluation.probes import is_randomised
from . import rules

METHODS = ("ibp", "crown-ibp", "crown")
NORMS = ("linf", "l2", "l1")  # L2 and L1 through the box around their ball
LINEAR_RULES = ("cosine", "dot_l2", "dot_linf")


def network_layers(model: nn.Module) -> tuple[list[nn.Module], torch.Tensor | None]:
    """``(layers, directions)``: the model as layers applied in order, and, for a prototype head, the
    direction q_j [k, D] of each class (its score's argmax is that of ``<z, q_j>``); None for logits."""
    directions = None
    if hasattr(model, "prototypes") and hasattr(model, "network"):
        rule = getattr(model, "distance", None)
        if rule not in LINEAR_RULES:
            raise UserError(f"certified bounds cover heads whose rule is linear in the embedding ({', '.join(LINEAR_RULES)},"
                            f" or logits); this model's rule is {rule!r}")
        P = model.prototypes.float()
        directions = torch.nn.functional.normalize(P, dim=1) if rule == "cosine" else P
        model = model.network
    elif hasattr(model, "network") and hasattr(model, "centres"):  # PCLClassifier: classifies by its logits
        model = model.network
    if not (hasattr(model, "normalize") and hasattr(model, "body")):
        raise UserError(f"certified bounds need a model built by repulsor (normalisation + body); got {type(model).__name__}")
    body = model.body
    if hasattr(body, "layers"):
        body_layers = list(body.layers())
    elif isinstance(body, nn.Sequential):
        body_layers = _leaves(body)
    else:
        raise UserError(f"certified bounds do not cover the body {type(body).__name__}: it lists no layers (it has"
                        " operations outside Linear, Conv2d, ReLU, batch norm, pooling and flatten)")
    layers = [model.normalize, *body_layers]
    for layer in layers:
        rules.check_layer(layer)
    return layers, directions


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _spec(y: torch.Tensor, k: int, directions: torch.Tensor | None) -> torch.Tensor:
    """[B, k-1, out]: one row per other class j, ``e_y - e_j`` (logits) or ``q_y - q_j`` (prototypes)."""
    eye = torch.eye(k, device=y.device) if directions is None else directions.to(y.device)
    others = torch.stack([torch.cat([torch.arange(c), torch.arange(c + 1, k)]) for c in range(k)]).to(y.device)
    return eye[y].unsqueeze(1) - eye[others[y]]


def _ibp(layers, lower, upper, bounds=None):
    """Interval bounds of every layer's input (and the last output): a list of (lower, upper)."""
    out = [(lower, upper)]
    for i, layer in enumerate(layers):
        lower, upper = rules.interval(layer, lower, upper)
        if bounds is not None and i + 1 < len(bounds) and bounds[i + 1] is not None:
            lower, upper = torch.maximum(lower, bounds[i + 1][0]), torch.minimum(upper, bounds[i + 1][1])
        out.append((lower, upper))
    return out


def _crown_lower(layers, lam, bounds) -> torch.Tensor:
    """The CROWN lower bound [B, m] of ``lam . f(x)`` with f = the composition of ``layers``;
    ``bounds[i]``: the bounds of layer i's input (bounds[0]: the input box)."""
    bias = torch.zeros(lam.shape[:2], dtype=lam.dtype, device=lam.device)
    for i in range(len(layers) - 1, -1, -1):
        lam, bias = rules.backward(layers[i], lam, bias, *bounds[i])
    return rules.concretize(lam, bias, *bounds[0])


def _tighten_with_crown(layers, bounds, chunk: int = 512):
    """Replace the input bounds of every ReLU and max pool by the tighter of CROWN's and IBP's."""
    for i, layer in enumerate(layers):
        if not isinstance(layer, rules.MONOTONE) or i == 0:
            continue
        low, up = bounds[i]
        b, shape = low.shape[0], low.shape[1:]
        n = low[0].numel()
        new_low, new_up = [], []
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            eye = torch.zeros(b, size, n, dtype=low.dtype, device=low.device)
            eye[:, torch.arange(size), torch.arange(start, start + size)] = 1
            eye = eye.reshape(b, size, *shape)
            new_low.append(_crown_lower(layers[:i], eye, bounds))
            new_up.append(-_crown_lower(layers[:i], -eye, bounds))
        crown_low = torch.cat(new_low, 1).reshape(low.shape)
        crown_up = torch.cat(new_up, 1).reshape(up.shape)
        bounds[i] = (torch.maximum(low, crown_low), torch.minimum(up, crown_up))
        # Later layers' interval bounds follow from the tighter ones.
        bounds[i:] = _ibp(layers[i:], *bounds[i], bounds=bounds[i:])
    return bounds


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                  method: str = "crown") -> torch.Tensor:
    """Lower bounds [N, k-1] of the margins (true class minus each other class) over the threat model."""
    if method not in METHODS:
        raise UserError(f"unknown certification method {method!r}: choose one of {', '.join(METHODS)}")
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
    with torch.no_grad():
        ibp, layers, bounds, spec = _ibp_bounds(model, x, y, eps)
    if method == "ibp":
        return ibp
    with torch.no_grad():
        if method == "crown-ibp":
            return torch.maximum(_crown_lower(layers, spec, bounds), ibp)
        bounds = _tighten_with_crown(layers, bounds)
        crown = _crown_lower(layers, spec, bounds)
        return torch.maximum(crown, _ibp_margins(layers, bounds, spec))


def ibp_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """IBP lower bounds [N, k-1] of the margins over the L-inf ball of radius ``eps`` within [0, 1],
    differentiable in the model's weights: what certified training minimises the loss of."""
    return _ibp_bounds(model, x, y, eps)[0]


def _ibp_bounds(model, x, y, eps):
    layers, directions = network_layers(model)
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    bounds = _ibp(layers, lower, upper)
    out_low = bounds[-1][0]
    k = len(directions) if directions is not None else out_low.shape[1]
    spec = _spec(y, k, directions).to(out_low.dtype)
    # IBP on the margins: the last layer and the margin folded into one linear map when it is Linear.
    return _ibp_margins(layers, bounds, spec), layers, bounds, spec


def _ibp_margins(layers, bounds, spec) -> torch.Tensor:
    if isinstance(layers[-1], nn.Linear):
        low, up = bounds[-2]
        weight = spec @ layers[-1].weight  # [B, m, in]
        bias = spec @ layers[-1].bias if layers[-1].bias is not None else torch.zeros(spec.shape[:2], device=spec.device)
    else:
        low, up = bounds[-1]
        weight, bias = spec, torch.zeros(spec.shape[:2], device=spec.device)
    mid, rad = (up + low) / 2, (up - low) / 2
    return bias + torch.einsum("bmi,bi->bm", weight, mid.flatten(1)) - torch.einsum("bmi,bi->bm", weight.abs(),
                                                                                     rad.flatten(1))


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
            method: str = "crown", batch_size: int = 32) -> dict:
    """Certified accuracy of ``model`` on ``x`` [N, C, H, W] in [0, 1], labels ``y`` [N].

    Returns ``{"method", "norm", "eps", "n", "clean_accuracy", "certified_accuracy", "certified" (bool
    per point, a list), "seconds"}``. ``certified_accuracy`` is a lower bound of the robust accuracy
    under any attack in the threat model.
    """
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
    check_eps(eps, norm, x[0].numel() if x.dim() > 1 else None)
    started = time.time()
    certified, clean = [], []
    with evaluating(model):
        device = next(model.parameters()).device
        network_layers(model)  # a model the bounds do not cover fails before any work
        if len(y) and is_randomised(model, x, device=device, batch_size=batch_size):
            raise UserError("this model is randomised (two forward passes differ): a certificate bounds one fixed"
                            " function; certify its deterministic part, or attack it with the rand suite")
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
            with torch.no_grad():
                clean.append((model(xb).argmax(1) == yb).cpu())
            margins = margin_bounds(model, xb, yb, eps=eps, norm=norm, method=method)
            certified.append((margins > 0).all(1).cpu())
    certified_t = torch.cat(certified) if certified else torch.zeros(0, dtype=torch.bool)
    clean_t = torch.cat(clean) if clean else torch.zeros(0, dtype=torch.bool)
    n = len(y)
    return {"method": method, "norm": norm, "eps": eps, "n": n,
            "clean_accuracy": clean_t.float().mean().item() if n else 0.0,
            "certified_accuracy": certified_t.float().mean().item() if n else 0.0,
            "certified": certified_t.tolist(), "seconds": round(time.time() - started, 3)}
