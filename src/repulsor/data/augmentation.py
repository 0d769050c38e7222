"""Batched training augmentation: random crop (zero or reflect padding) and horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .registry import dataset_info

__all__ = ["default_augmentation", "configured_augmentation", "augment", "alternating_flips", "PADDINGS", "FLIPS"]

PADDINGS = ("zeros", "reflect")  # what the translations bring in at the border
FLIPS = ("random", "alternate")  # a fresh random half every epoch | each image mirrored every other epoch


def default_augmentation(name: str) -> dict:
    """The standard training augmentation of a data set, as keyword arguments of ``augment``.

    Returns:
        ``{"crop_padding": 4, "flip": True}`` for CIFAR-10/100 (random crop and mirror);
        ``{"crop_padding": 0, "flip": False}`` (none) for digits, MNIST and Fashion-MNIST,
        where a mirrored digit is a different symbol.
    """
    info = dataset_info(name)
    if info.name in ("cifar10", "cifar100"):
        return {"crop_padding": 4, "flip": True}
    return {"crop_padding": 0, "flip": False}


def configured_augmentation(name: str, augment: str, crop_padding: int, padding: str = "zeros") -> dict:
    """The keyword arguments of ``augment`` that the settings ``data.augment``, ``crop_padding``
    and ``padding`` ask for on data set ``name`` (``augment``: auto | none | crop_flip)."""
    if augment == "none":
        return {"crop_padding": 0, "flip": False}
    aug = {"crop_padding": 4, "flip": True} if augment == "crop_flip" else default_augmentation(name)
    return {**aug, "crop_padding": crop_padding, "padding": padding} if aug["crop_padding"] else aug


def augment(
    x: torch.Tensor,
    *,
    generator: torch.Generator | None,
    crop_padding: int = 4,
    flip: bool = True,
    padding: str = "zeros",
    mirrored: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random crop and horizontal flip, for a whole batch at once.

    Each image is padded by ``crop_padding`` pixels on every side, an H x W window at a random
    offset in [0, 2 * crop_padding] (per axis, per image) is cut out, and the window is
    mirrored left-right with probability 1/2 (or where ``mirrored`` says). All of it is one
    gather, on ``x``'s device.

    Args:
        x: images [N, C, H, W], any float dtype, any device.
        generator: torch.Generator for the random offsets and flips (drawn on the
            generator's device, normally the CPU, then moved to ``x.device``), so the result
            is reproducible whatever device ``x`` is on.
        crop_padding: padding in pixels; 0 disables cropping.
        flip: whether to mirror a random half of the images.
        padding: ``"zeros"`` (black borders) or ``"reflect"`` (the image mirrored at its edge,
            as the airbench recipes pad).
        mirrored: which images to mirror, a bool tensor [N], instead of a random half (``flip``
            must be True); ``alternating_flips`` makes one. No flips are drawn then.

    Returns:
        Augmented images [N, C, H, W], same dtype and device as ``x`` (``x`` itself when both
        augmentations are off).
    """
    if x.dim() != 4:
        raise ValueError(f"augment expects images [N, C, H, W], got shape {tuple(x.shape)}")
    pad = int(crop_padding)
    if pad < 0:
        raise UserError(f"crop_padding must be >= 0, got {crop_padding}")
    if padding not in PADDINGS:
        raise UserError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    if pad >= min(x.shape[2:]) and padding == "reflect":
        raise UserError(f"crop_padding = {pad} with reflect padding needs images larger than {pad} pixels,"
                        f" got {tuple(x.shape[2:])}: use a smaller crop_padding")
    if mirrored is not None and (not flip or mirrored.shape != (x.shape[0],) or mirrored.dtype != torch.bool):
        raise ValueError(f"mirrored must be a bool tensor [{x.shape[0]}] and flip True, got {tuple(mirrored.shape)}"
                         f" {mirrored.dtype} with flip={flip}")
    if pad == 0 and not flip:
        return x
    n, _, h, w = x.shape
    device = x.device
    rng_device = generator.device if generator is not None else torch.device("cpu")
    # Always draw offsets then flips, in this order, so a seed gives the same batch whatever
    # the device of x.
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rng_device).to(device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rng_device).to(device)
    rows = dy[:, None] + torch.arange(h, device=device)  # [N, H], in padded coordinates
    cols = dx[:, None] + torch.arange(w, device=device)  # [N, W]
    if flip:
        if mirrored is None:
            mirrored = torch.rand(n, generator=generator, device=rng_device) < 0.5
        mirrored = mirrored.to(device)
        # Reading the crop's columns right-to-left is cropping then mirroring.
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    padded = F.pad(x, (pad, pad, pad, pad), mode="constant" if padding == "zeros" else "reflect") if pad else x
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice: the result is [N, H, W, C].
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def alternating_flips(first: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images to mirror in ``epoch`` (from 0) under alternating flips: the random half
    ``first`` [N] (bool, over the whole training set) in even epochs, the other half in odd
    ones, so that every image is seen both ways in every two epochs (the airbench recipes'
    flips, which a fresh random half per epoch matches only on average)."""
    return first ^ bool(epoch % 2)
