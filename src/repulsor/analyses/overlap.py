"""How far two models fail alike (Section 5): the overlap of their misclassified adversarial
examples and the agreement of their top-1 and top-2 adversarial classes."""

from __future__ import annotations

import torch

from ..attacks import evaluating
from ..errors import UserError
from ..store import files as ckpt
from .confusion import confusion_matrix
from .scores import check_pair, class_scores, device_of, ratio, top_wrong


def misclassification_overlap(wrong_a: torch.Tensor, wrong_b: torch.Tensor, confused_a: torch.Tensor,
                              confused_b: torch.Tensor) -> dict:
    """How much two models' misclassified adversarial examples coincide (Section 5).

    Both runs were evaluated on the same N points.

    Args:
        wrong_a, wrong_b: BoolTensor [N], True where the run's adversarial example is
            misclassified.
        confused_a, confused_b: LongTensor [N, k'] (k' >= 1): per point, the classes with the
            highest adversarial scores other than the true class, best first (for a
            misclassified point, column 0 is the adversarial prediction).

    Returns:
        A dict: ``n``, ``n_wrong_a``, ``n_wrong_b``, ``n_both``, ``n_either``, ``jaccard``
        (both / either), ``shared_of_a`` (both / wrong_a), ``shared_of_b`` (both / wrong_b);
        on the points both get wrong: ``n_top1_agree`` and ``top1_agreement`` (same
        adversarial class), ``n_top2_agree`` and ``top2_agreement`` (same set of the two
        best wrong classes; with k' = 1 it equals top-1). Rates are None when their
        denominator is zero.
    """
    wrong_a = torch.as_tensor(wrong_a).bool().cpu().flatten()
    wrong_b = torch.as_tensor(wrong_b).bool().cpu().flatten()
    confused_a = torch.as_tensor(confused_a).long().cpu()
    confused_b = torch.as_tensor(confused_b).long().cpu()
    if confused_a.dim() == 1:
        confused_a = confused_a[:, None]
    if confused_b.dim() == 1:
        confused_b = confused_b[:, None]
    n = len(wrong_a)
    if len(wrong_b) != n or len(confused_a) != n or len(confused_b) != n:
        raise UserError("wrong_a, wrong_b, confused_a and confused_b must describe the same N points")
    both = wrong_a & wrong_b
    either = wrong_a | wrong_b
    n_both, n_either = int(both.sum()), int(either.sum())
    top1 = confused_a[both, 0] == confused_b[both, 0]
    width = min(2, confused_a.shape[1], confused_b.shape[1])
    top2 = (confused_a[both, :width].sort(1).values == confused_b[both, :width].sort(1).values).all(1)
    return {
        "n": n,
        "n_wrong_a": int(wrong_a.sum()),
        "n_wrong_b": int(wrong_b.sum()),
        "n_both": n_both,
        "n_either": n_either,
        "jaccard": ratio(n_both, n_either),
        "shared_of_a": ratio(n_both, int(wrong_a.sum())),
        "shared_of_b": ratio(n_both, int(wrong_b.sum())),
        "n_top1_agree": int(top1.sum()),
        "top1_agreement": ratio(int(top1.sum()), n_both),
        "n_top2_agree": int(top2.sum()),
        "top2_agreement": ratio(int(top2.sum()), n_both),
    }


def _ranked_wrong_classes(row: torch.Tensor, true_class: int) -> list[int]:
    """Classes with a non-zero count other than ``true_class``, by count (ties: lower index)."""
    order = sorted((j for j in range(len(row)) if j != true_class and row[j] > 0), key=lambda j: (-int(row[j]), j))
    return order


def confusion_agreement(matrix_a: torch.Tensor, matrix_b: torch.Tensor) -> dict:
    """Per true class, do two confusion matrices share their most frequent wrong classes?

    The class-level reading of Section 5 ("60% of the top-1 misclassified classes are the
    same ... 90% when we judge the top-2 classes"): for each true class, rank the wrong
    classes by count (ties by class index).

    Args:
        matrix_a, matrix_b: counts [k, k] (rows: true class).

    Returns:
        ``n_classes_top1`` (classes where both matrices have a wrong prediction),
        ``top1_agreement`` (fraction of those with the same most frequent wrong class),
        ``n_classes_top2`` (classes where both have at least two distinct wrong classes),
        ``top2_agreement`` (fraction of those with the same set of the two most frequent),
        ``top1_in_top2`` (fraction of the top-1 classes where each model's most frequent
        wrong class is among the other's two most frequent). None when nothing compares.
    """
    if matrix_a.shape != matrix_b.shape:
        raise UserError(f"confusion matrices differ in shape: {tuple(matrix_a.shape)} vs {tuple(matrix_b.shape)}")
    n1 = a1 = n2 = a2 = cross = 0
    for c in range(matrix_a.shape[0]):
        ra, rb = _ranked_wrong_classes(matrix_a[c], c), _ranked_wrong_classes(matrix_b[c], c)
        if ra and rb:
            n1 += 1
            a1 += ra[0] == rb[0]
            cross += ra[0] in rb[:2] and rb[0] in ra[:2]
        if len(ra) >= 2 and len(rb) >= 2:
            n2 += 1
            a2 += set(ra[:2]) == set(rb[:2])
    return {"n_classes_top1": n1, "top1_agreement": ratio(a1, n1), "n_classes_top2": n2,
            "top2_agreement": ratio(a2, n2), "top1_in_top2": ratio(cross, n1)}


def compare_runs_overlap(model_a: torch.nn.Module, model_b: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                         x_adv_a: torch.Tensor, x_adv_b: torch.Tensor, *, path=None, batch_size: int = 256,
                         device=None) -> dict:
    """``misclassification_overlap`` of two models, each on its own adversarial examples.

    A point is wrong for a model when its adversarial example (``x_adv_a`` for ``model_a``,
    ``x_adv_b`` for ``model_b``) is misclassified, whether or not the clean point was. The
    top-2 wrong classes come from each model's scores on its own adversarial example.

    Args:
        model_a, model_b: map images to class scores [N, k] (same k); evaluated inside
            ``evaluating``.
        x: clean images [N, C, H, W] (the same points for both); y: labels [N].
        x_adv_a, x_adv_b: adversarial images [N, C, H, W] of each model.
        path: optional JSON file to write the result to (atomically).
        batch_size: examples per forward pass. device: default: model_a's device.

    Returns:
        The ``misclassification_overlap`` dict plus ``clean_accuracy_a/_b``,
        ``adversarial_accuracy_a/_b`` and ``per_class`` (``confusion_agreement`` of the two
        adversarial confusion matrices of clean-correct points), and ``json`` when written.
    """
    check_pair(x, y)
    check_pair(x_adv_a, y, "x_adv_a")
    check_pair(x_adv_b, y, "x_adv_b")
    device = device_of(model_a, device)
    y = y.cpu()
    summary = {}
    for name, model, x_adv in (("a", model_a, x_adv_a), ("b", model_b, x_adv_b)):
        with evaluating(model):
            clean = class_scores(model, x, batch_size, device).argmax(1)
            scores = class_scores(model, x_adv, batch_size, device)
        summary[name] = (clean, scores)
    k_a, k_b = summary["a"][1].shape[1], summary["b"][1].shape[1]
    if k_a != k_b:
        raise UserError(f"the two models have different numbers of classes ({k_a} vs {k_b})")
    (clean_a, scores_a), (clean_b, scores_b) = summary["a"], summary["b"]
    adv_a, adv_b = scores_a.argmax(1), scores_b.argmax(1)
    result = misclassification_overlap(adv_a != y, adv_b != y, top_wrong(scores_a, y), top_wrong(scores_b, y))
    ok_a, ok_b = clean_a == y, clean_b == y
    result.update({
        "definition": "wrong = the model's own adversarial example is misclassified; top-1/top-2 = the best "
                      "wrong classes of its adversarial scores, compared on the points both get wrong",
        "clean_accuracy_a": ok_a.float().mean().item(),
        "clean_accuracy_b": ok_b.float().mean().item(),
        "adversarial_accuracy_a": (adv_a == y).float().mean().item(),
        "adversarial_accuracy_b": (adv_b == y).float().mean().item(),
        "per_class": confusion_agreement(confusion_matrix(y[ok_a], adv_a[ok_a], k_a),
                                         confusion_matrix(y[ok_b], adv_b[ok_b], k_b)),
    })
    if path is not None:
        result["json"] = str(path)
        ckpt.atomic_write_json(path, result)
    return result
