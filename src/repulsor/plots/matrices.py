"""Matrix figures: confusion matrices and the prototypes' cosine similarities."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..store import files as ckpt
from . import draw


def row_normalise(matrix: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum (rows summing to zero stay zero): float [k, k]."""
    matrix = matrix.float()
    return matrix / matrix.sum(1, keepdim=True).clamp_min(1)


def plot_confusion(matrix: torch.Tensor, class_names, path, title: str = "Adversarial confusion") -> dict:
    """Write a row-normalised heat map of a confusion matrix (PNG) and its counts (CSV).

    Args:
        matrix: counts [k, k] (rows: true class, columns: predicted class).
        class_names: k names.
        path: the PNG file; the counts go to the same name with ``.csv``.

    Returns:
        ``{"png": str, "csv": str}``.
    """
    k = matrix.shape[0]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise UserError(f"{len(names)} class names for a {k}-class confusion matrix")
    png = draw.png_path(path)
    normalised = row_normalise(matrix)
    side = min(max(4.5, 0.55 * k + 2.5), 12.0)
    fig = draw.new_figure(side, side * 0.9)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    draw.label_class_axes(ax, names)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                value = normalised[i, j].item()
                if matrix[i, j] > 0:
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 0.5 else "black")
    ax.set_xlabel("adversarial prediction")
    ax.set_ylabel("true class")
    ax.set_title(title)
    draw.save_figure(fig, png)
    csv_path = png.with_suffix(".csv")
    rows = [["true \\ predicted", *names]] + [[names[i], *matrix[i].tolist()] for i in range(k)]
    ckpt.atomic_write_text(csv_path, draw.csv_text(rows))
    return {"png": str(png), "csv": str(csv_path)}


def plot_prototype_similarity(cos: torch.Tensor, class_names, path, title: str = "Prototype cosine similarity") -> dict:
    """Heat map of the prototypes' pairwise cosine similarities ``cos`` [k, k]; PNG and CSV."""
    png = draw.png_path(path)
    k = cos.shape[0]
    names = [str(c) for c in class_names]
    side = min(max(4.5, 0.5 * k + 2.5), 11.0)
    fig = draw.new_figure(side, side * 0.85)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(cos.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    draw.label_class_axes(ax, names)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(cos[i, j]) > 0.6 else "black")
    off = cos[~torch.eye(k, dtype=torch.bool)]
    ax.set_title(f"{title}\nmax off-diagonal {off.max():.3f}, mean {off.mean():.3f}", fontsize=10)
    draw.save_figure(fig, png)
    csv_path = png.with_suffix(".csv")
    rows = [["class", *names]] + [[names[i], *[round(v, 6) for v in cos[i].tolist()]] for i in range(k)]
    ckpt.atomic_write_text(csv_path, draw.csv_text(rows))
    return {"png": str(png), "csv": str(csv_path), "max_cosine": off.max().item(), "mean_cosine": off.mean().item()}
