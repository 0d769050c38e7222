"""What every attack shares: the evaluation context, input and score checks, seeded random
starts, and the one loss-and-input-gradient call.

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
from .geometry import geometry


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


@contextmanager
def channels_last_weights(model: nn.Module, enabled: bool = True):
    """Hold ``model``'s 4-D parameters and buffers (convolution filters) in channels-last memory
    order inside the block; put the original tensors back on exit, also when the body raises.

    Only the order in memory changes, not one value: a convolution with channels-last filters
    computes in channels-last order on the CPU (oneDNN). On the fast CIFAR-10 body in fp32 a
    forward pass is 1.3-1.5x faster and a pass with the input gradient 1.1-1.5x; on the
    one-channel MNIST CNN it was mixed, 0.85-1.8x and 1.0-1.1x (``bench/pass_cost.py``).
    Activations and input gradients then come out channels-last; ``input_grad`` returns its
    gradient in the input's own order. ``enabled = False``: the block runs on the model as it is.
    """
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4] if enabled else []
    saved = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
        yield model
    finally:
        for t, data in zip(tensors, saved):
            t.data = data


def check_attack_inputs(x, y, eps, norm: str, *, ndim: int | None = None, per_coordinate: bool = False):
    """The checks every attack call starts with; returns ``(x, y, geometry(norm), eps)``.

    ``x`` comes back detached, ``y`` as int64 on ``x.device`` (losses and ``one_hot`` need
    int64 labels), ``eps`` as a float. Raises ``UserError`` for an unknown norm, malformed
    images or labels (``check_images``) or an ``eps`` that is not a finite number >= 0.
    With ``per_coordinate`` (PGD only), ``eps`` may also be a tensor broadcastable to ``x``
    for the L-inf ball: one radius per coordinate, returned expanded to ``x``'s shape.
    """
    geom = geometry(norm)
    check_images(x, y, ndim=ndim)
    if per_coordinate and torch.is_tensor(eps):
        eps = check_radii(eps, x, norm)
    else:
        eps = check_number("eps", eps)
    return x.detach(), y.to(device=x.device, dtype=torch.int64), geom, eps


def check_radii(eps: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """An L-inf radius per coordinate: finite, >= 0, broadcastable to ``x``; expanded to its shape."""
    if norm != "linf":
        raise UserError(f"a radius per coordinate is an L-inf threat model; got norm {norm!r}")
    if not eps.is_floating_point() or not torch.isfinite(eps).all() or (eps < 0).any():
        raise UserError("eps per coordinate must be finite floats >= 0")
    try:
        return eps.detach().to(device=x.device, dtype=x.dtype).expand_as(x).clone()
    except RuntimeError:
        raise UserError(f"eps of shape {list(eps.shape)} does not broadcast to the images {list(x.shape)}") from None


def check_images(x, y, *, ndim: int | None = None) -> None:
    """Check that ``x`` is a float batch [N, ...] in [0, 1] and ``y`` int labels [N].

    ``ndim``: the exact number of dimensions ``x`` must have (4 for attacks that work on
    image windows or per-image broadcasting); None accepts any batch with ``x.dim() >= 2``.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2 or (ndim is not None and x.dim() != ndim):
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


def check_number(
    name: str, value, *, minimum: float = 0.0, strict: bool = False, maximum: float | None = None
) -> float:
    """Check a finite real setting (``eps``, ``alpha``...) against its bounds.

    ``minimum`` is excluded when ``strict``; ``maximum``, when given, is included.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number; got {value!r}")
    too_low = value < minimum or (strict and value == minimum)
    if maximum is not None and (too_low or value > maximum):
        raise UserError(f"{name} must be in {'(' if strict else '['}{minimum:g}, {maximum:g}]; got {value!r}")
    if too_low:
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


def check_scores(scores, x, y, target) -> None:
    """Raise ``UserError`` unless ``scores`` is [N, k] and labels and targets lie in [0, k)."""
    if not torch.is_tensor(scores) or scores.dim() != 2 or scores.shape[0] != x.shape[0]:
        got = list(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise UserError(f"the model must return class scores of shape [N, k] = [{x.shape[0]}, k]; got {got}")
    k = scores.shape[1]
    for name, labels in (("label", y), ("target", target)):
        if labels is not None and labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise UserError(f"{name}s must lie in [0, {k - 1}] for a model with {k} classes")


def require_classes(what: str, scores: torch.Tensor, needed: int, advice: str | None = None) -> None:
    """Raise ``UserError`` when ``scores`` [N, k] has fewer than ``needed`` classes."""
    k = scores.shape[1]
    if k < needed:
        raise UserError(f"{what} needs at least {needed} classes (got {k})" + (f"; {advice}" if advice else ""))


def model_scores(model, x: torch.Tensor, y, target=None) -> torch.Tensor:
    """The model's scores [N, k] at ``x`` in float32, after ``check_scores``.

    Keeps autograd as the caller set it: losses call it inside ``loss_and_grad``; use
    ``scores_no_grad`` for forward passes that need no gradient.
    """
    scores = model(x)
    check_scores(scores, x, y, target)
    return scores.float()


def scores_no_grad(model, x: torch.Tensor, y, target=None) -> torch.Tensor:
    """``model_scores`` under ``torch.no_grad()``: clean predictions, success checks, queries."""
    with torch.no_grad():
        return model_scores(model, x, y, target)


def correct_every_time(model, x: torch.Tensor, y: torch.Tensor, votes: int = 1) -> torch.Tensor:
    """Bool [N] on ``y``'s device: ``x`` classified as ``y`` in every one of ``votes`` forward
    passes. For a randomised model a lucky pass must not count as a correct one."""
    correct = torch.ones(len(y), dtype=torch.bool, device=y.device)
    with torch.no_grad():
        for _ in range(votes):
            correct &= model(x).argmax(1) == y
    return correct


def batched(fn, *tensors: torch.Tensor, batch_size: int, device) -> torch.Tensor | None:
    """``fn(*batches)`` over ``tensors`` [N, ...], batch by batch on ``device``, without gradients:
    the results concatenated on the CPU (None for N = 0). The one batched forward pass."""
    out = []
    with torch.no_grad():
        for start in range(0, len(tensors[0]), batch_size):
            out.append(fn(*(t[start : start + batch_size].to(device) for t in tensors)).cpu())
    return torch.cat(out) if out else None


def attack_survivors(model, attack, x: torch.Tensor, y: torch.Tensor, robust: torch.Tensor, *, batch_size: int,
                     device, votes: int = 1, x_worst: torch.Tensor | None = None, progress=None) -> int:
    """Attack the points still ``robust``, batch by batch, and mark those the attack fools.

    The one loop behind the cascade, the robustness curve and the sanity checks.

    Args:
        model: the model the examples are checked on (``correct_every_time`` with ``votes``).
        attack: ``attack(xb, yb, start) -> x_adv`` for a batch on ``device``; ``start`` is the
            batch's offset among the attacked points (for per-batch seeds).
        x: images [N, ...] (any device); y: labels [N].
        robust: bool [N] on the CPU, updated in place: a fooled point becomes False.
        batch_size: points per attack call; device: where the batches go.
        x_worst: [N, ...] on the CPU, or None; where given, fooled points get their example.
        progress: called with the size of every finished batch (a progress bar), or None.

    Returns:
        The number of points attacked.
    """
    index = robust.nonzero().squeeze(1)
    for start in range(0, len(index), batch_size):
        chunk = index[start : start + batch_size]
        xb, yb = x[chunk].to(device), y[chunk].to(device)
        x_adv = attack(xb, yb, start).detach()
        fooled = (~correct_every_time(model, x_adv, yb, votes)).cpu()
        robust[chunk[fooled]] = False
        if x_worst is not None:
            x_worst[chunk[fooled]] = x_adv[fooled].cpu()
        if progress is not None:
            progress(len(chunk))
    return len(index)


def wrong_classes_by_score(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class indices [N, k] per example, highest score first, the true class ``y`` last.

    Column ``t`` is each example's (t + 1)-th most likely wrong class, for t < k - 1:
    the target order of the targeted attacks (APGD-T, FAB-T).
    """
    return scores.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)


def random_start(geom, x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """A random start in the eps-ball for every example of ``x`` [N, ...].

    Drawn on the CPU then moved to ``x.device``, so the same seed gives the same start on
    every device. ``eps`` is a number or a per-example tensor [N] on any device. PGD and
    APGD draw it for the whole batch, so the random stream (and each example's start) does
    not depend on which examples are still being attacked; FAB draws it for the points it
    restarts only.
    """
    eps = eps.cpu() if torch.is_tensor(eps) else eps
    return geom.random_start(x.detach().cpu(), eps, generator).to(x.device)


def keep_worst_case(active, run_x, run_loss, run_fooled, x_adv, best_loss, fooled) -> None:
    """Merge one run into each example's worst case so far, in place.

    ``x_adv`` [N, ...], ``best_loss`` [N] and ``fooled`` [N] hold the worst case per example;
    the run covers the examples ``active`` [m] (indices into N) with ``run_x`` [m, ...],
    ``run_loss`` [m] and ``run_fooled`` [m]. A misclassifying point beats a correctly
    classified one; between two of the same kind, the higher loss wins.
    """
    was_fooled = fooled[active]
    better = (run_fooled & ~was_fooled) | ((run_fooled == was_fooled) & (run_loss > best_loss[active]))
    chosen = active[better]
    x_adv[chosen], best_loss[chosen], fooled[chosen] = run_x[better], run_loss[better], run_fooled[better]


class Averaged:
    """A loss averaged over ``samples`` forward and backward passes: Expectation over
    Transformation (Athalye et al., ICML 2018) for models that draw randomness per pass.

    ``loss_and_grad`` returns the mean loss, the mean scores and the mean input gradient of
    the samples, one backward pass at a time (memory of one pass). Build it with ``with_eot``.
    """

    def __init__(self, loss_fn, samples: int):
        self.loss_fn, self.samples = loss_fn, samples

    def __call__(self, model, x, y, target=None):
        return self.loss_fn(model, x, y, target)


def with_eot(loss_fn, eot):
    """``loss_fn`` averaged over ``eot`` gradient samples per step; ``eot = 1`` returns
    ``loss_fn`` itself, so an attack without EOT runs exactly as before."""
    eot = check_int("eot", eot, minimum=1)
    return loss_fn if eot == 1 else Averaged(loss_fn, eot)


def loss_and_grad(model, loss_fn, x_adv: torch.Tensor, y: torch.Tensor, target, need_grad: bool = True):
    """Per-example loss [N], scores [N, k] and the input gradient [N, ...] at ``x_adv``.

    The gradient is taken with ``torch.autograd.grad`` with respect to the input only, so no
    parameter ``.grad`` is created even when parameters require gradients. Returns detached
    tensors; the gradient is None when ``need_grad`` is False (the last iterate). For an
    ``Averaged`` loss all three are means over its samples.
    """
    samples = loss_fn.samples if isinstance(loss_fn, Averaged) else 1
    total = None
    for _ in range(samples):
        if not need_grad:
            with torch.no_grad():
                loss, scores = loss_fn(model, x_adv, y, target)
            grad = None
        else:
            x_in = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                loss, scores = loss_fn(model, x_in, y, target)
                grad = input_grad(loss, x_in).detach()
        sample = (loss.detach(), scores.detach(), grad)
        total = sample if total is None else tuple(None if a is None else a + b for a, b in zip(total, sample))
    if samples == 1:
        return total
    return tuple(None if value is None else value / samples for value in total)


def input_grad(value: torch.Tensor, x_adv: torch.Tensor, *, retain_graph: bool = False) -> torch.Tensor:
    """Gradient of ``value.sum()`` with respect to the input ``x_adv`` only, shape of ``x_adv``.

    ``x_adv`` must require gradients and ``value`` must have been computed from it with
    autograd enabled. Zeros where the input does not reach ``value``; ``retain_graph`` keeps
    the graph for one more call (a Jacobian, one class at a time).
    """
    if not value.requires_grad:
        raise UserError(
            "the model's scores do not depend on its input through autograd "
            "(is there a torch.no_grad() or .detach() inside forward?)"
        )
    (grad,) = torch.autograd.grad(value.sum(), x_adv, retain_graph=retain_graph, allow_unused=True)
    # in x_adv's memory order: a model with channels-last filters hands back a channels-last gradient
    return torch.zeros_like(x_adv) if grad is None else grad.contiguous(memory_format=_memory_format(x_adv))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored that way (and not also contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"tensor of shape {list(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
