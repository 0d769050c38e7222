"""Image figures: adversarial examples beside their clean images and perturbations, nearest
neighbour grids, the 2-D map of a representation space."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..store import files as ckpt
from . import draw


def neighbour_grid(x_query: torch.Tensor, y_query: torch.Tensor, pred_query: torch.Tensor, x_train: torch.Tensor,
                   neighbours: torch.Tensor, class_names, path, *, y_train: torch.Tensor | None = None,
                   distances: torch.Tensor | None = None, query_ids=None, train_ids=None) -> dict:
    """An image grid of misclassified examples and their nearest training samples (Figure 5c).

    Row i: the query image (left, titled "true→predicted"), then the training images
    ``x_train[neighbours[i]]`` nearest first (titled with their class when ``y_train`` is
    given, and distance when ``distances`` is given). Entries of -1 are left blank.
    Writes the PNG and a JSON (same name, ``.json``) of the rows.

    Args:
        x_query: images [Q, C, H, W] with C = 1 or 3; y_query: true labels [Q];
            pred_query: predicted labels [Q].
        x_train: images [N, C, H, W]; neighbours: LongTensor [Q, k] of indices into x_train.
        class_names: names of the classes.
        path: the PNG file.
        y_train: optional labels [N] of the training images.
        distances: optional [Q, k] distances to show and record.
        query_ids: optional Q identifiers of the queries (e.g. test indices) for the JSON.
        train_ids: optional identifiers of the rows of ``x_train`` recorded in the JSON (default:
            the row indices), for a grid drawn from a gathered subset of the training images.

    Returns:
        ``{"png": str, "json": str}``.
    """
    png = draw.png_path(path)
    names = [str(c) for c in class_names]
    q = len(x_query)
    neighbours = torch.as_tensor(neighbours).long().cpu()
    if neighbours.dim() != 2 or len(neighbours) != q:
        raise UserError(f"neighbours must be [Q, k] with Q = {q}; got {tuple(neighbours.shape)}")
    k = neighbours.shape[1]
    cell = 1.25
    fig = draw.new_figure(cell * (k + 1) + 0.3, cell * max(q, 1) + 0.3)
    rows = []
    if q == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified adversarial examples", ha="center", va="center")
    for i in range(q):
        true, pred = int(y_query[i]), int(pred_query[i])
        ax = fig.add_subplot(q, k + 1, i * (k + 1) + 1)
        array, cmap = draw.image_array(x_query[i])
        ax.imshow(array, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{names[true]}→{names[pred]}", fontsize=7, color="red")
        ax.axis("off")
        for j in range(k):
            index = int(neighbours[i, j])
            ax = fig.add_subplot(q, k + 1, i * (k + 1) + 2 + j)
            ax.axis("off")
            if index < 0:
                continue
            array, cmap = draw.image_array(x_train[index])
            ax.imshow(array, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            label = names[int(y_train[index])] if y_train is not None else f"#{index}"
            if distances is not None:
                label += f"\n{float(distances[i, j]):.3g}"
            ax.set_title(label, fontsize=6)
        row = {"query": query_ids[i] if query_ids is not None else i, "true": true, "pred": pred,
               "true_name": names[true], "pred_name": names[pred],
               "neighbours": [(int(train_ids[v]) if train_ids is not None else int(v)) if v >= 0 else -1
                              for v in neighbours[i].tolist()]}
        if y_train is not None:
            row["neighbour_classes"] = [int(y_train[v]) if v >= 0 else None for v in neighbours[i].tolist()]
        if distances is not None:
            row["distances"] = [float(v) if math.isfinite(float(v)) else None for v in distances[i]]
        rows.append(row)
    fig.subplots_adjust(wspace=0.1, hspace=0.5)
    draw.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"rows": rows})
    return {"png": str(png), "json": str(json_path)}


def magnify_perturbation(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The perturbation as an image: ``(x_adv - x) * 0.5 / eps + 0.5`` (grey = unchanged;
    black / white = -eps / +eps). For L2 the scale is the largest absolute pixel change."""
    delta = (x_adv - x).float()
    if norm == "linf" and eps > 0:
        scale = 0.5 / eps
    else:
        peak = delta.abs().max().item()
        scale = 0.5 / peak if peak > 0 else 1.0
    return (delta * scale + 0.5).clamp(0, 1)


def plot_adversarial_grid(x, x_adv, y, pred_clean, pred_adv, class_names, path, *, eps: float, norm: str,
                          ids=None) -> dict:
    """Columns of test points; rows: clean image, adversarial image, perturbation magnified. PNG and JSON."""
    png = draw.png_path(path)
    names = [str(c) for c in class_names]
    m = len(x)
    fig = draw.new_figure(1.3 * max(m, 1) + 0.9, 4.4)
    if m == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no test points", ha="center", va="center")
    delta = magnify_perturbation(x, x_adv, eps, norm)
    labels = ("clean", "adversarial", "perturbation\n(magnified)")
    rows = []
    for j in range(m):
        t, pc, pa = int(y[j]), int(pred_clean[j]), int(pred_adv[j])
        for i, (img, title, colour) in enumerate(((x[j], f"{names[t]}: {names[pc]}", "black" if pc == t else "red"),
                                                   (x_adv[j], f"→ {names[pa]}", "black" if pa == t else "red"),
                                                   (delta[j], "", "black"))):
            ax = fig.add_subplot(3, m, i * m + j + 1)
            array, cmap = draw.image_array(img)
            ax.imshow(array, cmap=cmap if cmap else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if title:
                ax.set_title(title, fontsize=7, color=colour)
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=7)
        rows.append({"id": ids[j] if ids is not None else j, "true": t, "clean_pred": pc, "adv_pred": pa,
                     "max_abs_change": (x_adv[j] - x[j]).abs().max().item()})
    scale = f"× {0.5 / eps:.3g} + 0.5" if norm == "linf" and eps > 0 else "scaled to its largest change"
    fig.suptitle(f"clean (title: true: predicted), adversarial (→ prediction), perturbation {scale}", fontsize=8)
    fig.subplots_adjust(wspace=0.08, hspace=0.35)
    draw.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"eps": eps, "norm": norm, "points": rows})
    return {"png": str(png), "json": str(json_path)}


def plot_embedding_pca(projected: dict, y: torch.Tensor, class_names, path, *, normalise: bool,
                       title: str = "Test embeddings (PCA)") -> dict:
    """Scatter of embeddings in the plane of their first two principal components, coloured by
    class, with the prototypes as stars: ``projected`` is ``analyses.embedding.project_2d``'s
    ``points`` [N, 2], ``prototypes`` [k, 2] and ``explained_variance`` [2]. PNG and JSON."""
    png = draw.png_path(path)
    zp, pp = projected["points"].numpy(), projected["prototypes"].numpy()
    ratio = torch.as_tensor(projected["explained_variance"])
    k = pp.shape[0]
    names = [str(c) for c in class_names]
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "hsv"]

    def colour(c):
        return cmap(c % cmap.N) if k <= 20 else cmap(c / k)

    fig = draw.new_figure(6.4, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    yl = y.cpu().tolist()
    ax.scatter(zp[:, 0], zp[:, 1], c=[colour(c) for c in yl], s=9, alpha=0.6, linewidths=0)
    ax.scatter(pp[:, 0], pp[:, 1], c=[colour(c) for c in range(k)], marker="*", s=260, edgecolors="black",
               linewidths=1.0, zorder=3)
    if k <= 20:
        for c in range(k):
            ax.annotate(names[c], (pp[c, 0], pp[c, 1]), textcoords="offset points", xytext=(6, 6), fontsize=8,
                        fontweight="bold")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=colour(c), label=names[c]) for c in range(k)]
        handles.append(Line2D([], [], marker="*", linestyle="", color="white", markeredgecolor="black",
                              markersize=12, label="prototype"))
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title(title + (" on the unit sphere" if normalise else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    draw.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"normalised": normalise, "explained_variance": ratio.tolist(),
                                       "n": len(zp), "prototypes_2d": pp.tolist()})
    return {"png": str(png), "json": str(json_path), "explained_variance": ratio.tolist()}
