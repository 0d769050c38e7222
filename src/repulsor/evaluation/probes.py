"""What the cascade and the sanity checks measure about a model before attacking it: whether two
forward passes differ (a randomised model), whether its scores reach the input through autograd,
whether it runs with channels-last filters, and its input gradients (in fp32 or under autocast),
with their agreement."""

from __future__ import annotations

import math

import torch

from ..attacks import LOSSES, channels_last_weights

CHECK_POINTS = 200  # the probes and the checks look at the first 200 points
DETERMINISM_RTOL = 1e-6  # of the largest score: allows non-deterministic GPU reductions
LAYOUT_POINTS = 8  # the images on which channels-last filters must give the same scores
LAYOUT_RTOL = 1e-4  # of the largest score: another summation order, not another function


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The low-precision dtype training would autocast to on ``device`` (None: no autocast)."""
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16  # fp16 is what underflows; bf16 shares fp32's exponent range
    return None


def input_gradients(model, x: torch.Tensor, y: torch.Tensor, loss: str, *, device, batch_size: int,
                    autocast_dtype: torch.dtype | None = None, eot: int = 1) -> torch.Tensor:
    """Per-example input gradients of an attack loss, as the attacks would see them.

    Args:
        model: maps images [N, C, H, W] in [0, 1] to class scores [N, k]; not modified.
        x: images [N, C, H, W] (any device); y: labels [N].
        loss: a key of ``repulsor.attacks.LOSSES`` (``"ce"``, ``"cw"``...).
        device: where to compute; batch_size: examples per forward/backward pass.
        autocast_dtype: run the forward pass under ``torch.autocast`` with this dtype, or
            None for plain fp32.
        eot: gradient samples averaged per example (for a randomised model), default 1.

    Returns:
        float32 tensor [N, C*H*W] on the CPU. A loss that does not depend on the input
        through autograd (``.detach()`` or ``no_grad`` inside the model) gives zeros: to an
        attacker that is exactly a zero gradient.
    """
    loss_fn = LOSSES[loss]
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device).detach().requires_grad_(True)
        yb = y[start : start + batch_size].to(device)
        total = torch.zeros_like(xb)
        for _ in range(eot):
            with torch.enable_grad():
                if autocast_dtype is None:
                    values, _ = loss_fn(model, xb, yb)
                else:
                    with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype):
                        values, _ = loss_fn(model, xb, yb)
                grad = None
                if values.requires_grad:
                    (grad,) = torch.autograd.grad(values.float().sum(), xb, allow_unused=True)
            if grad is not None:
                total += grad.detach().float()
        out.append((total / eot).flatten(1).cpu())
    return torch.cat(out) if out else torch.empty(0, x[0].numel() if len(x) else 0)


def useless_gradients(grads: torch.Tensor) -> torch.Tensor:
    """Bool [N]: rows of ``grads`` [N, D] that are exactly zero everywhere or not finite.

    A non-finite gradient gives an attacker no direction either, so it counts with the zeros.
    """
    if grads.numel() == 0:
        return torch.zeros(grads.shape[0], dtype=torch.bool)
    return (grads.abs().amax(dim=1) == 0) | ~torch.isfinite(grads).all(dim=1)


def gradient_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float]:
    """How well low-precision input gradients agree with fp32 ones.

    Args:
        reference: fp32 gradients [N, D]; other: gradients under autocast [N, D].

    Returns:
        ``(median_cosine, zero_reference, zero_other)``: the median over examples of the
        cosine similarity of the two gradients (1 when both are zero, since they then
        agree; 0 when only one is zero or either is non-finite), and the fraction of
        examples whose gradient is useless (all zero or non-finite) in each.
    """
    if reference.shape != other.shape:
        raise ValueError(f"gradient shapes differ: {tuple(reference.shape)} and {tuple(other.shape)}")
    if reference.shape[0] == 0:
        return 1.0, 0.0, 0.0
    ref, oth = reference.double(), other.double()
    bad_ref, bad_oth = useless_gradients(reference), useless_gradients(other)
    ref, oth = torch.nan_to_num(ref), torch.nan_to_num(oth)
    # float64, so that gradients of about 1e-30 (still usable by a sign step) do not make
    # their squared norms underflow to zero.
    cosine = torch.nn.functional.cosine_similarity(ref, oth, dim=1, eps=1e-300)
    cosine = torch.where(bad_ref | bad_oth, torch.zeros_like(cosine), cosine)
    cosine = torch.where(bad_ref & bad_oth, torch.ones_like(cosine), cosine)
    return (cosine.median().item(), bad_ref.double().mean().item(), bad_oth.double().mean().item())


def score_spread(model, x: torch.Tensor, *, device, batch_size: int) -> tuple[float, float]:
    """``(largest difference, tolerance)`` between two forward passes on the images ``x``.

    The tolerance is 1e-6 times the largest absolute score (room for non-deterministic GPU
    reductions); a model whose difference exceeds it draws randomness at every pass. Scores
    that are NaN in both passes count as equal.
    """
    largest_diff, largest_score = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            first, second = model(xb).float(), model(xb).float()
            diff = (first - second).abs()
            diff = torch.where(torch.isnan(first) & torch.isnan(second), torch.zeros_like(diff), diff)
            largest_diff = max(largest_diff, float(torch.nan_to_num(diff, nan=math.inf).max()))
            finite = first[torch.isfinite(first)]
            if finite.numel():
                largest_score = max(largest_score, float(finite.abs().max()))
    return largest_diff, DETERMINISM_RTOL * largest_score


def is_randomised(model, x: torch.Tensor, *, device, batch_size: int) -> bool:
    """Whether two forward passes on the first ``CHECK_POINTS`` images of ``x`` differ."""
    largest_diff, tolerance = score_spread(model, x[:CHECK_POINTS], device=device, batch_size=batch_size)
    return largest_diff > tolerance


def runs_channels_last(model, x: torch.Tensor, *, device) -> bool:
    """Whether ``model`` runs with its filters held channels-last (``channels_last_weights``) and
    gives the same scores on the first ``LAYOUT_POINTS`` images of ``x`` as it does as it is, to
    ``LAYOUT_RTOL`` of the largest score. False for a model that raises in that order (one that
    ``view``s a filter or an activation), that computes something else in it, or that draws
    randomness at every pass (its two passes differ anyway): such a model is evaluated as it is."""
    xb = x[:LAYOUT_POINTS].to(device)
    with torch.no_grad():
        reference = model(xb).float()
        try:
            with channels_last_weights(model):
                scores = model(xb).float()
        except RuntimeError:
            return False
    if scores.shape != reference.shape or not torch.isfinite(reference).all():
        return False
    return bool((scores - reference).abs().max() <= LAYOUT_RTOL * reference.abs().max())


def has_input_gradient(model, x: torch.Tensor, y: torch.Tensor, *, device) -> bool:
    """Whether the model's scores reach its input through autograd (a few points suffice).

    False for a model with a non-differentiable step (``(x > 0.5).float()``, a ``no_grad``
    preprocessor, ``.detach()``): no gradient attack can run on it without ``bpda``.
    Asks autograd whether the scores reach ``x`` itself, not only the model's parameters, so
    the answer does not depend on whether the parameters are frozen.
    """
    xb = x[:8].to(device).detach().requires_grad_(True)
    with torch.enable_grad():
        scores = model(xb)
        if not scores.requires_grad:
            return False
        (grad,) = torch.autograd.grad(scores.float().sum(), xb, allow_unused=True)
    return grad is not None
