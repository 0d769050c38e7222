"""Adversarial confusion matrices (Figure 5a-b): where the adversarial examples of correctly
classified points land."""

from __future__ import annotations

from pathlib import Path

import torch

from ..attacks import evaluating
from ..errors import UserError
from ..plots.matrices import plot_confusion
from .scores import check_pair, class_scores, device_of


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of (true, predicted) pairs.

    Args:
        y_true: labels [N] (int); y_pred: predicted classes [N] (int), values in [0, k).
        num_classes: k.

    Returns:
        LongTensor [k, k]: entry [i, j] counts points of true class i predicted as j.
    """
    y_true = torch.as_tensor(y_true).long().cpu().flatten()
    y_pred = torch.as_tensor(y_pred).long().cpu().flatten()
    if y_true.shape != y_pred.shape:
        raise UserError(f"y_true and y_pred differ in length ({len(y_true)} vs {len(y_pred)})")
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes})")
    counts = torch.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def adversarial_confusion(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                          class_names, path_prefix, *, batch_size: int = 256, device=None,
                          title: str = "Adversarial confusion") -> dict:
    """The confusion matrix of adversarial predictions of clean-correct points (Figure 5a-b).

    Only points that ``model`` classifies correctly when clean count; each is placed at
    (true class, prediction on its adversarial example), so the diagonal holds the points
    that stay robust. Writes ``<path_prefix>.png`` (row-normalised heat map with class
    names) and ``<path_prefix>.csv`` (counts).

    Args:
        model: maps images to class scores [N, k]; evaluated inside ``evaluating(model)``.
        x: clean images [N, C, H, W]; y: labels [N]; x_adv: adversarial images [N, C, H, W].
        class_names: k class names.
        path_prefix: output path without extension.

    Returns:
        ``matrix`` (LongTensor [k, k]), ``n_correct`` (clean-correct points), ``n_fooled``
        (of those, misclassified adversarially), ``png``, ``csv``.
    """
    check_pair(x, y)
    check_pair(x_adv, y, "x_adv")
    device = device_of(model, device)
    y = y.cpu()
    with evaluating(model):
        clean = class_scores(model, x, batch_size, device).argmax(1)
        adv = class_scores(model, x_adv, batch_size, device).argmax(1)
    k = len(class_names)
    correct = clean == y
    matrix = confusion_matrix(y[correct], adv[correct], k)
    prefix = Path(path_prefix)
    paths = plot_confusion(matrix, class_names, prefix.with_name(prefix.name + ".png"), title=title)
    return {"matrix": matrix, "n_correct": int(correct.sum()), "n_fooled": int((correct & (adv != y)).sum()), **paths}
