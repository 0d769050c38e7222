"""What every analysis starts from: a model's class scores on images, and checks of its inputs."""

from __future__ import annotations

import torch

from ..attacks import batched
from ..errors import UserError


def device_of(model, device):
    """``device`` if given, else the device of the model's parameters (CPU without any)."""
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def class_scores(model, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Class scores [N, k] (float32, CPU) of ``model`` on ``x``, batched, without gradients."""
    scores = batched(lambda xb: model(xb).float(), x, batch_size=batch_size, device=device)
    if scores is None:
        raise UserError("no images given: x is empty")
    return scores


def check_pair(x: torch.Tensor, y: torch.Tensor, what: str = "x") -> None:
    """Refuse anything but images [N, C, H, W] with labels [N], in one line."""
    if not torch.is_tensor(x) or x.dim() != 4 or not torch.is_tensor(y) or y.dim() != 1 or len(x) != len(y):
        shape_x = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        shape_y = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise UserError(f"expected images {what} [N, C, H, W] and labels [N]; got {shape_x} and {shape_y}")


def top_wrong(scores: torch.Tensor, y: torch.Tensor, k: int = 2) -> torch.Tensor:
    """The ``k`` highest-scoring classes other than the true one, best first: LongTensor [N, k]."""
    k = min(k, scores.shape[1] - 1)
    masked = scores.clone().float()
    masked[torch.arange(len(y)), y] = float("-inf")
    return masked.topk(k, dim=1).indices


def ratio(num: int, den: int):
    """``num / den``, or None when ``den`` is zero."""
    return num / den if den else None
