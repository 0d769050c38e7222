"""Analyses of trained models: the paper's Figures 2-5 and the numbers of its Section 5.

- Robustness curves (Figures 2-3): PGD-20 accuracy as the perturbation grows from
  8/255 to 16/255.
- Adversarial confusion matrices (Figure 5a-b): where the adversarial examples of
  correctly classified points land.
- The overlap of two models' misclassified adversarial examples, and the agreement of
  their top-1 and top-2 adversarial classes (Section 5).
- Nearest correctly classified training samples of misclassified adversarial examples in
  representation space (Figure 5c).
- Clean and robust validation accuracy over the epochs of training (Figure 4).

The computing functions are pure functions on models and tensors; the ``plot_*`` and
writing functions render with matplotlib's Agg canvas (no pyplot state, nothing left
open) and write every file atomically, each PNG with its numbers beside it as CSV or JSON.
``analyse_run`` runs everything on a run directory and writes ``RUN/analysis/``.

Images are float tensors [N, C, H, W] in [0, 1]; models map them to class scores [N, k].
Models are evaluated inside ``attacks.evaluating`` (eval mode, frozen parameters,
restored afterwards); attacks are ``attacks.pgd``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..store import files as ckpt
from ..plots import draw as plots
from ..formats import as_number, is_grey_levels
from ..attacks import attack_survivors, batched, evaluating, geometry, pgd
from ..errors import UserError
from ..runtime import derive_seed, resolve_device
from .. import data as data_mod
from ..evaluation import run as evaluation_run
from ..evaluation.cascade import evaluate
from ..store import run as store



#: The paper's robustness-curve grid for L-inf: 8/255 to 16/255 in steps of 1/255.
LINF_EPS_VALUES = tuple(i / 255 for i in range(8, 17))
#: The analogous grid for L2: 0.5 to 1.0 (the radius doubles, as in the paper).
L2_EPS_VALUES = tuple(0.5 + 0.0625 * i for i in range(9))


# ------------------------------------------------------------------ shared helpers


def _device_of(model, device):
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


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str = "x") -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or not torch.is_tensor(y) or y.dim() != 1 or len(x) != len(y):
        shape_x = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        shape_y = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise UserError(f"expected images {what} [N, C, H, W] and labels [N]; got {shape_x} and {shape_y}")


def _top_wrong(scores: torch.Tensor, y: torch.Tensor, k: int = 2) -> torch.Tensor:
    """The ``k`` highest-scoring classes other than the true one, best first: LongTensor [N, k]."""
    k = min(k, scores.shape[1] - 1)
    masked = scores.clone().float()
    masked[torch.arange(len(y)), y] = float("-inf")
    return masked.topk(k, dim=1).indices


def _ratio(num: int, den: int):
    return num / den if den else None


# ------------------------------------------------------------------ robustness curves


def default_eps_values(norm: str = "linf") -> tuple[float, ...]:
    """The default robustness-curve grid: 8/255..16/255 for ``linf``, 0.5..1.0 for ``l2``."""
    geometry(norm)
    return LINF_EPS_VALUES if norm == "linf" else L2_EPS_VALUES


def robustness_curve(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps_values=None,
                     norm: str = "linf", steps: int = 20, loss: str = "ce", seed: int = 0,
                     batch_size: int = 256, device=None) -> list[dict]:
    """Robust accuracy under PGD-``steps`` at each perturbation size (Figures 2-3).

    Each eps runs ``attacks.pgd`` with step size eps/4, one random start and the given
    loss, the model inside ``evaluating(model)``. The eps values are processed in increasing
    order and only points that survived every smaller eps are attacked: an adversarial
    example found at a smaller eps lies inside every larger ball, so the accuracy at eps is
    the worst case over all attacks with radius <= eps, and the curve is non-increasing.

    Args:
        model: maps images [N, C, H, W] in [0, 1] to class scores [N, k].
        x: images [N, C, H, W] in [0, 1]; y: labels [N] (int64).
        eps_values: perturbation sizes in pixel units (default ``default_eps_values(norm)``:
            8/255..16/255 in steps of 1/255 for linf).
        norm: ``linf`` or ``l2``.
        steps: PGD iterations (20 as in the paper).
        loss: attack loss, a key of ``attacks.LOSSES`` (default ``ce``).
        seed: seeds every random start (each eps and batch derives its own seed).
        batch_size: examples per attack call.
        device: where to run; default: the model's device.

    Returns:
        One dict per eps, in increasing eps order: ``eps``, ``accuracy`` (fraction of the N
        points classified correctly under every attack of radius <= eps; misclassified clean
        points count as wrong), ``n``.
    """
    geometry(norm)
    _check_pair(x, y)
    eps_list = sorted(float(e) for e in (default_eps_values(norm) if eps_values is None else eps_values))
    if not eps_list:
        raise UserError("eps_values is empty: give at least one perturbation size")
    if eps_list[0] < 0 or not all(math.isfinite(e) for e in eps_list):
        raise UserError(f"eps_values must be finite and >= 0; got {eps_list}")
    device = _device_of(model, device)
    y = y.cpu()
    curve = []
    with evaluating(model):
        robust = class_scores(model, x, batch_size, device).argmax(1) == y
        for eps in eps_list:
            if eps > 0:
                attack_survivors(model, lambda xb, yb, start, eps=eps: pgd(
                    model, xb, yb, eps=eps, alpha=eps / 4, steps=steps, norm=norm, loss=loss,
                    seed=derive_seed(seed, "robustness-curve", repr(eps), start)), x, y, robust,
                    batch_size=batch_size, device=device)
            curve.append({"eps": eps, "accuracy": robust.float().mean().item(), "n": len(y)})
    return curve


def plot_robustness_curves(curves: dict[str, list[dict]], path, title: str = "Robustness curve (PGD-20)", *,
                           norm: str = "linf") -> dict:
    """Draw one robustness curve per model and write the PNG and a JSON of the numbers.

    Args:
        curves: ``{label: robustness_curve(...)}``, each a list of ``{"eps", "accuracy", ...}``.
        path: the PNG file; the numbers go to the same name with ``.json``.
        title: the plot title.
        norm: ``linf`` shows eps in /255 units when every eps is a whole number of grey
            levels (8/255..16/255), as is otherwise (MNIST's 0.3) and for ``l2``.

    Returns:
        ``{"png": str, "json": str}``.
    """
    geometry(norm)
    if not curves:
        raise UserError("no robustness curves to plot")
    png = plots.png_path(path)
    grey = norm == "linf" and all(is_grey_levels(entry["eps"]) for curve in curves.values() for entry in curve)
    scale = 255.0 if grey else 1.0
    fig = plots.new_figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, curve) in enumerate(curves.items()):
        points = sorted((entry["eps"], entry["accuracy"]) for entry in curve)
        ax.plot([e * scale for e, _ in points], [100 * a for _, a in points], marker="o", markersize=4,
                color=f"C{i % 10}", label=str(label))
    ax.set_xlabel("ε (/255)" if grey else f"ε ({'L-inf' if norm == 'linf' else 'L2'})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    plots.legend(ax)
    plots.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"title": title, "norm": norm, "curves": {str(k): v for k, v in curves.items()}})
    return {"png": str(png), "json": str(json_path)}


# ------------------------------------------------------------------ confusion matrices


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
    png = plots.png_path(path)
    normalised = row_normalise(matrix)
    side = min(max(4.5, 0.55 * k + 2.5), 12.0)
    fig = plots.new_figure(side, side * 0.9)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    plots.label_class_axes(ax, names)
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
    plots.save_figure(fig, png)
    csv_path = png.with_suffix(".csv")
    rows = [["true \\ predicted", *names]] + [[names[i], *matrix[i].tolist()] for i in range(k)]
    ckpt.atomic_write_text(csv_path, plots.csv_text(rows))
    return {"png": str(png), "csv": str(csv_path)}


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
    _check_pair(x, y)
    _check_pair(x_adv, y, "x_adv")
    device = _device_of(model, device)
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


# ------------------------------------------------------------------ overlap of two models' failures


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
        "jaccard": _ratio(n_both, n_either),
        "shared_of_a": _ratio(n_both, int(wrong_a.sum())),
        "shared_of_b": _ratio(n_both, int(wrong_b.sum())),
        "n_top1_agree": int(top1.sum()),
        "top1_agreement": _ratio(int(top1.sum()), n_both),
        "n_top2_agree": int(top2.sum()),
        "top2_agreement": _ratio(int(top2.sum()), n_both),
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
    return {"n_classes_top1": n1, "top1_agreement": _ratio(a1, n1), "n_classes_top2": n2,
            "top2_agreement": _ratio(a2, n2), "top1_in_top2": _ratio(cross, n1)}


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
    _check_pair(x, y)
    _check_pair(x_adv_a, y, "x_adv_a")
    _check_pair(x_adv_b, y, "x_adv_b")
    device = _device_of(model_a, device)
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
    result = misclassification_overlap(adv_a != y, adv_b != y, _top_wrong(scores_a, y), _top_wrong(scores_b, y))
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


# ------------------------------------------------------------------ nearest neighbours


def _representation(model, x: torch.Tensor, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(representation [N, D], predictions [N]) on the CPU: ``embed`` if the model has it, else scores."""
    zs, preds = [], []
    has_embed = hasattr(model, "embed")
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            if has_embed:
                z = model.embed(xb)
                s = model.scores(z) if hasattr(model, "scores") else model(xb)
            else:
                z = s = model(xb)
            zs.append(z.float().flatten(1).cpu())
            preds.append(s.argmax(1).cpu())
    if not zs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(zs), torch.cat(preds)


def nearest_training_neighbours(model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                                x_query: torch.Tensor, *, k: int = 5, batch_size: int = 512,
                                query_classes: torch.Tensor | None = None, device=None):
    """The k nearest correctly classified training samples of each query in representation space.

    Representation: ``model.embed(x)`` when the model has ``embed`` (prototype models),
    else its class scores. Distance: cosine distance (1 - cosine similarity) when
    ``model.distance == "cosine"``, else L2. Training samples that the model misclassifies
    are never returned.

    Args:
        model: evaluated inside ``evaluating(model)``.
        x_train: images [N, C, H, W]; y_train: labels [N].
        x_query: images [Q, C, H, W] (e.g. misclassified adversarial examples).
        k: neighbours per query.
        batch_size: images per forward pass.
        query_classes: optional LongTensor [Q]: only training samples of this class are
            candidates for each query (Section 5 takes them from the predicted class).
        device: default: the model's device.

    Returns:
        ``(indices, distances)``: LongTensor [Q, k] of row indices into ``x_train``, nearest
        first, and float32 [Q, k] distances. When fewer than k candidates exist, the
        missing entries are -1 and ``inf``.
    """
    _check_pair(x_train, y_train, "x_train")
    if not torch.is_tensor(x_query) or x_query.dim() != 4:
        raise UserError("x_query must be images [Q, C, H, W]")
    if k < 1:
        raise UserError(f"k must be >= 1; got {k}")
    device = _device_of(model, device)
    with evaluating(model):
        z_train, pred_train = _representation(model, x_train, batch_size, device)
        z_query, _ = _representation(model, x_query, batch_size, device)
    q = len(x_query)
    indices = torch.full((q, k), -1, dtype=torch.long)
    distances = torch.full((q, k), float("inf"), dtype=torch.float32)
    candidates = (pred_train == y_train.cpu()).nonzero().squeeze(1)
    if q == 0 or len(candidates) == 0:
        return indices, distances
    z_cand = z_train[candidates]
    labels = y_train.cpu()[candidates]
    cosine = getattr(model, "distance", None) == "cosine"
    if cosine:
        z_cand = F.normalize(z_cand, dim=1)
    if query_classes is not None:
        query_classes = torch.as_tensor(query_classes).long().cpu().flatten()
        if len(query_classes) != q:
            raise UserError(f"query_classes has {len(query_classes)} entries for {q} queries")
    take = min(k, len(candidates))
    for start in range(0, q, batch_size):
        zq = z_query[start : start + batch_size]
        if cosine:
            d = 1 - F.normalize(zq, dim=1) @ z_cand.T
        else:
            d = torch.cdist(zq, z_cand, compute_mode="donot_use_mm_for_euclid_dist")
        if query_classes is not None:
            d = d.masked_fill(labels[None, :] != query_classes[start : start + batch_size, None], float("inf"))
        best = d.topk(take, dim=1, largest=False)
        found = torch.isfinite(best.values)
        idx = torch.where(found, candidates[best.indices], torch.full_like(best.indices, -1))
        indices[start : start + len(zq), :take] = idx
        distances[start : start + len(zq), :take] = best.values
    return indices, distances


def neighbour_grid(x_query: torch.Tensor, y_query: torch.Tensor, pred_query: torch.Tensor, x_train: torch.Tensor,
                   neighbours: torch.Tensor, class_names, path, *, y_train: torch.Tensor | None = None,
                   distances: torch.Tensor | None = None, query_ids=None) -> dict:
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

    Returns:
        ``{"png": str, "json": str}``.
    """
    png = plots.png_path(path)
    names = [str(c) for c in class_names]
    q = len(x_query)
    neighbours = torch.as_tensor(neighbours).long().cpu()
    if neighbours.dim() != 2 or len(neighbours) != q:
        raise UserError(f"neighbours must be [Q, k] with Q = {q}; got {tuple(neighbours.shape)}")
    k = neighbours.shape[1]
    cell = 1.25
    fig = plots.new_figure(cell * (k + 1) + 0.3, cell * max(q, 1) + 0.3)
    rows = []
    if q == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified adversarial examples", ha="center", va="center")
    for i in range(q):
        true, pred = int(y_query[i]), int(pred_query[i])
        ax = fig.add_subplot(q, k + 1, i * (k + 1) + 1)
        array, cmap = plots.image_array(x_query[i])
        ax.imshow(array, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{names[true]}→{names[pred]}", fontsize=7, color="red")
        ax.axis("off")
        for j in range(k):
            index = int(neighbours[i, j])
            ax = fig.add_subplot(q, k + 1, i * (k + 1) + 2 + j)
            ax.axis("off")
            if index < 0:
                continue
            array, cmap = plots.image_array(x_train[index])
            ax.imshow(array, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            label = names[int(y_train[index])] if y_train is not None else f"#{index}"
            if distances is not None:
                label += f"\n{float(distances[i, j]):.3g}"
            ax.set_title(label, fontsize=6)
        row = {"query": query_ids[i] if query_ids is not None else i, "true": true, "pred": pred,
               "true_name": names[true], "pred_name": names[pred],
               "neighbours": [int(v) for v in neighbours[i]]}
        if y_train is not None:
            row["neighbour_classes"] = [int(y_train[v]) if v >= 0 else None for v in neighbours[i].tolist()]
        if distances is not None:
            row["distances"] = [float(v) if math.isfinite(float(v)) else None for v in distances[i]]
        rows.append(row)
    fig.subplots_adjust(wspace=0.1, hspace=0.5)
    plots.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"rows": rows})
    return {"png": str(png), "json": str(json_path)}


# ------------------------------------------------------------------ training curves


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line; blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"metrics file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"metrics file {path} is a folder; give RUN/metrics.jsonl") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"line {number} of {path} is not JSON ({error})") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise UserError(f"line {number} of {path} has no epoch")
        records.append(record)
    return records


def plot_metrics_over_epochs(metrics_paths, path, title: str = "Validation accuracy during training") -> dict:
    """Robust (solid) and clean (dashed) validation accuracy per epoch of one or more runs (Figure 4).

    Epochs without validation (no ``val_clean`` key) and null ``val_robust`` values (runs
    trained without a threat model) are left out of the lines but kept, empty, in the CSV.

    Args:
        metrics_paths: ``{label: path to metrics.jsonl}``, or a single path (labelled by its
            run folder's name).
        path: the PNG file; the CSV goes to the same name with ``.csv`` (columns: run,
            epoch, train_loss, lr, val_clean, val_robust).
        title: the plot title.

    Returns:
        ``png``, ``csv`` and ``runs``: per label, ``epochs``, ``best_robust`` and
        ``best_robust_epoch``, ``last_robust`` (None without robust values), ``best_clean``,
        ``last_clean``.
    """
    if isinstance(metrics_paths, (str, Path)):
        metrics_paths = {Path(metrics_paths).resolve().parent.name: metrics_paths}
    if not metrics_paths:
        raise UserError("no metrics files to plot")
    png = plots.png_path(path)
    fig = plots.new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    rows = [["run", "epoch", "train_loss", "lr", "val_clean", "val_robust"]]
    runs = {}
    for i, (label, metrics_path) in enumerate(metrics_paths.items()):
        records = read_metrics(metrics_path)
        color = f"C{i % 10}"
        series = {}
        for key in ("val_robust", "val_clean"):
            series[key] = [(r["epoch"], as_number(r.get(key))) for r in records if as_number(r.get(key)) is not None]
        if series["val_robust"]:
            epochs, values = zip(*series["val_robust"])
            ax.plot(epochs, [100 * v for v in values], color=color, marker="o", markersize=3, label=f"{label} robust")
        if series["val_clean"]:
            epochs, values = zip(*series["val_clean"])
            ax.plot(epochs, [100 * v for v in values], color=color, linestyle="--", marker="s", markersize=4,
                    markerfacecolor="white", label=f"{label} clean")
        for r in records:
            rows.append([label, r["epoch"], as_number(r.get("train_loss")), as_number(r.get("lr")),
                         as_number(r.get("val_clean")), as_number(r.get("val_robust"))])
        summary = {"epochs": len(records)}
        for key, name in (("val_robust", "robust"), ("val_clean", "clean")):
            points = series[key]
            best = max(points, key=lambda p: p[1]) if points else None
            summary[f"best_{name}"] = best[1] if best else None
            summary[f"best_{name}_epoch"] = best[0] if best else None
            summary[f"last_{name}"] = points[-1][1] if points else None
        runs[str(label)] = summary
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    last_epoch = max((summary["epochs"] for summary in runs.values()), default=1)
    ax.set_xlim(0.5, max(1, last_epoch) + 0.5)  # whole epochs, even for a one-epoch run
    ax.set_ylim(0, 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        plots.legend(ax)
    else:
        ax.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=ax.transAxes)
    plots.save_figure(fig, png)
    csv_path = png.with_suffix(".csv")
    ckpt.atomic_write_text(csv_path, plots.csv_text(rows))
    return {"png": str(png), "csv": str(csv_path), "runs": runs}


# ------------------------------------------------------------------ a whole run


def curve_eps_values(eps: float, norm: str) -> list[float]:
    """From the run's eps to twice it in 9 steps (8/255..16/255 at the default threat model)."""
    if norm == "linf" and is_grey_levels(eps):
        steps = round(eps * 255)
        return [min(i, 255) / 255 for i in range(steps, 2 * steps + 1, max(1, steps // 8))]
    return [min(eps * (1 + i / 8), 1.0) if norm == "linf" else eps * (1 + i / 8) for i in range(9)]


def _run_label(run_dir: Path, other: Path | None = None) -> str:
    name = run_dir.resolve().name
    if other is not None and other.resolve().name == name:
        return str(run_dir)
    return name


def _training_pool(cfg, data_dir, size: int):
    """The first ``size`` images of the run's training split, or a reason why they are unavailable."""
    d = cfg.data
    folders = [data_dir or d.data_dir or None]
    if data_dir and (d.data_dir or None) != data_dir:
        folders.append(d.data_dir or None)  # data_dir may name a test-only folder
    error = None
    for folder in folders:
        try:
            x, y = data_mod.load_dataset(d.name, "train", data_dir=folder, val_size=d.val_size or None,
                                         split_seed=d.split_seed)
            return x[:size], y[:size], None
        except UserError as exc:
            error = str(exc)
    return None, None, error


def analyse_run(run_dir, *, n: int | None = None, other_run=None, eps_values=None, data_dir: str | None = None,
                quiet: bool = True, neighbours_k: int = 5, neighbour_pool: int = 5000, grid_rows: int = 8,
                neighbours_in: str = "predicted", device: str = "auto", overrides: list[str] = ()) -> dict:
    """Run every analysis on a trained run and write ``RUN/analysis/``.

    The adversarial examples are those of the ``quick`` suite (PGD-20, step eps/4, random
    start, cross-entropy) at the run's ``[eval]`` threat model and seed, on the first ``n``
    test points. Files written into ``RUN/analysis/``:

    - ``robustness_curve.png/.json``: PGD-20 accuracy over ``eps_values`` (default: from the
      run's eps to twice it, 8/255..16/255 by default), and the other run's on the same
      points when ``other_run`` is given;
    - ``confusion.png/.csv``: the adversarial confusion matrix of clean-correct points;
    - ``neighbours.png/.json``: up to ``grid_rows`` misclassified adversarial examples
      (a seeded random sample) with their nearest correctly classified training samples
      among the first ``neighbour_pool`` training images (skipped, with the reason in the
      summary, when the training data cannot be loaded);
    - ``epochs.png/.csv`` when ``RUN/metrics.jsonl`` exists (with the other run's too);
    - ``overlap.json`` with ``other_run``: each model attacked with its own PGD-20 on the
      same points, compared by ``compare_runs_overlap``;
    - ``summary.json``: the returned dict.

    Args:
        run_dir: a run directory (``config.toml`` and a trained model).
        n: test points (the first n, unshuffled; default: the run's ``eval.n``).
        other_run: a second run directory on the same data set, for comparisons.
        eps_values: robustness-curve perturbation sizes (pixel units).
        data_dir: data folder overriding the config's.
        quiet: no progress output.
        neighbours_k: training neighbours per misclassified example.
        neighbour_pool: training images searched for neighbours.
        grid_rows: rows of the neighbour grid.
        neighbours_in: ``predicted`` (neighbours from the predicted, wrong class, as in
            Section 5) or ``all`` (any correctly classified training sample).
        device: ``auto``, ``cpu``, ``cuda``...
        overrides: ``eval.*`` and data-folder settings of the run changed for this call
            (``"eval.eps=0.1"``).

    Returns:
        A dict with ``paths`` (name -> file) and the key numbers: ``n``, ``eps``, ``norm``,
        ``clean_accuracy``, ``robust_accuracy``, ``robustness_curve``, ``confusion``
        (n_correct, n_fooled), ``neighbours`` (rows shown or why skipped), ``epochs``,
        ``overlap``.
    """
    from ..config import load_config, load_run_config

    if neighbours_in not in ("predicted", "all"):
        raise UserError(f"neighbours_in must be 'predicted' or 'all'; got {neighbours_in!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"--n {n!r}: give at least one test point")
    run_dir = Path(run_dir)
    out = run_dir / "analysis"
    dev = resolve_device(device)
    say = (lambda text: None) if quiet else (lambda text: print(f"[analyse] {text}", flush=True))

    model = store.load_model(run_dir, device=dev)
    cfg = load_run_config(run_dir, overrides)
    info = data_mod.DATASETS[cfg.data.name]
    eps, norm, seed, batch_size = cfg.eval.eps, cfg.eval.norm, cfg.eval.seed, cfg.eval.batch_size
    n = cfg.eval.n if n is None else n
    x, y, _ = evaluation_run.load_test_split(cfg, n, data_dir)
    label = _run_label(run_dir, Path(other_run) if other_run is not None else None)
    paths: dict[str, str] = {}
    summary: dict = {"run": str(run_dir), "n": len(y), "eps": eps, "norm": norm, "seed": seed, "paths": paths}

    say(f"PGD-20 at eps={eps:.4g} ({norm}) on {len(y)} test points")
    result = evaluate(model, x, y, suite="quick", eps=eps, norm=norm, batch_size=batch_size, seed=seed,
                                   device=dev, quiet=quiet, checks=False)
    x_adv = result.pop("x_adv")
    summary["clean_accuracy"], summary["robust_accuracy"] = result["clean_accuracy"], result["robust_accuracy"]

    other = None
    if other_run is not None:
        other_run = Path(other_run)
        other_model = store.load_model(other_run, device=dev)
        other_cfg = load_config(other_run / "config.toml")
        if other_cfg.data.name != cfg.data.name:
            raise UserError(f"{other_run} was trained on {other_cfg.data.name}, {run_dir} on {cfg.data.name}; "
                            "compare runs on the same data set")
        other_x, other_y, _ = evaluation_run.load_test_split(other_cfg, n, data_dir, say=lambda text: None)
        if other_x.shape != x.shape or not torch.equal(other_x, x) or not torch.equal(other_y, y):
            raise UserError(f"{other_run} and {run_dir} do not use the same test points; pass the same --data-dir")
        other_result = evaluate(other_model, x, y, suite="quick", eps=eps, norm=norm,
                                             batch_size=batch_size, seed=seed, device=dev, quiet=quiet, checks=False)
        other = (_run_label(other_run, run_dir), other_run, other_model, other_result.pop("x_adv"), other_result)

    # Figures 2-3: robustness curves.
    eps_list = list(eps_values) if eps_values is not None else curve_eps_values(eps, norm)
    say(f"robustness curve over {len(eps_list)} eps values")
    curves = {label: robustness_curve(model, x, y, eps_values=eps_list, norm=norm, steps=20, seed=seed,
                                      batch_size=batch_size, device=dev)}
    if other is not None:
        curves[other[0]] = robustness_curve(other[2], x, y, eps_values=eps_list, norm=norm, steps=20, seed=seed,
                                            batch_size=batch_size, device=dev)
    written = plot_robustness_curves(curves, out / "robustness_curve.png",
                                     title=f"PGD-20 robustness curve ({info.name})", norm=norm)
    paths["robustness_curve_png"], paths["robustness_curve_json"] = written["png"], written["json"]
    summary["robustness_curve"] = curves

    # Figure 5a-b: adversarial confusion matrix.
    confusion = adversarial_confusion(model, x, y, x_adv, info.classes, out / "confusion", batch_size=batch_size,
                                      device=dev, title=f"Adversarial confusion ({label})")
    paths["confusion_png"], paths["confusion_csv"] = confusion["png"], confusion["csv"]
    summary["confusion"] = {"n_correct": confusion["n_correct"], "n_fooled": confusion["n_fooled"]}

    # Figure 5c: nearest correctly classified training samples of misclassified examples.
    say("nearest training neighbours")
    grid = NeighbourGrid(k=neighbours_k, pool=neighbour_pool, rows=grid_rows, restrict=neighbours_in)
    found = neighbours(model, cfg, (x, y, x_adv), out, grid, data_dir=data_dir, seed=seed, batch_size=batch_size,
                       device=dev)
    if "png" in found:
        paths["neighbours_png"], paths["neighbours_json"] = found.pop("png"), found.pop("json")
    summary["neighbours"] = found

    # Figure 4: validation accuracy over epochs.
    metrics = {}
    if (run_dir / "metrics.jsonl").exists():
        metrics[label] = run_dir / "metrics.jsonl"
        if other is not None and (other[1] / "metrics.jsonl").exists():
            metrics[other[0]] = other[1] / "metrics.jsonl"
        written = plot_metrics_over_epochs(metrics, out / "epochs.png")
        paths["epochs_png"], paths["epochs_csv"] = written["png"], written["csv"]
        summary["epochs"] = written["runs"]

    # Section 5: overlap of misclassified adversarial examples.
    if other is not None:
        overlap = {"run_a": str(run_dir), "run_b": str(other[1]), "eps": eps, "norm": norm,
                   **compare_runs_overlap(model, other[2], x, y, x_adv, other[3], batch_size=batch_size, device=dev)}
        ckpt.atomic_write_json(out / "overlap.json", overlap)
        paths["overlap_json"] = str(out / "overlap.json")
        summary["overlap"] = overlap
        summary["other_run"] = {"run": str(other[1]), "clean_accuracy": other[4]["clean_accuracy"],
                                "robust_accuracy": other[4]["robust_accuracy"]}

    paths["summary_json"] = str(out / "summary.json")
    ckpt.atomic_write_json(out / "summary.json", summary)
    say(f"wrote {out}")
    return summary


def summary_lines(summary: dict) -> list[str]:
    """The key numbers of an ``analyse_run`` summary, one line each, for the command line."""
    def pct(value) -> str:
        return "–" if value is None else f"{100 * value:.1f}%"

    lines = [f"analysis of {summary['run']}: first {summary['n']} test points, {summary['norm']} eps ="
             f" {summary['eps']:.4g}, seed {summary['seed']}",
             f"  clean {pct(summary['clean_accuracy'])}, PGD-20 (CE) {pct(summary['robust_accuracy'])}"]
    for label, rows in summary.get("robustness_curve", {}).items():
        points = ", ".join(f"{row['eps']:.4g}: {pct(row['accuracy'])}" for row in rows)
        lines.append(f"  robustness curve of {label} (eps: PGD-20 accuracy): {points}")
    confusion = summary.get("confusion")
    if confusion:
        lines.append(f"  adversarial confusion: {confusion['n_fooled']} of {confusion['n_correct']} clean-correct"
                     " points fooled")
    neighbours = summary.get("neighbours") or {}
    if "skipped" in neighbours:
        lines.append(f"  neighbours: skipped ({neighbours['skipped']})")
    other = summary.get("other_run")
    if other:
        line = (f"  other run {other['run']}: clean {pct(other['clean_accuracy'])}, PGD-20 (CE)"
                f" {pct(other['robust_accuracy'])}")
        overlap = summary["overlap"]
        if overlap.get("jaccard") is not None:
            line += (f"; misclassified by both: {overlap['n_both']} of the {overlap['n_either']} misclassified by"
                     f" either (Jaccard {overlap['jaccard']:.3f})")
        lines.append(line)
    return lines


@dataclass(frozen=True)
class NeighbourGrid:
    """The neighbour grid's settings: ``k`` neighbours per row, searched among the first ``pool``
    training images, ``rows`` misclassified adversarial examples, neighbours ``restrict``-ed to
    the ``predicted`` (wrong) class or taken from ``all`` classes."""

    k: int = 5
    pool: int = 5000
    rows: int = 8
    restrict: str = "predicted"


def neighbours(model, cfg, examples: tuple, out: Path, grid: NeighbourGrid, *, data_dir, seed: int, batch_size: int,
               device) -> dict:
    """The neighbour grid of a run (Figure 5c) for ``examples`` = ``(x, y, x_adv)``, written to
    ``out/neighbours.png`` and ``.json``; returns its summary, with the files under ``png`` and
    ``json`` (or ``skipped`` and the reason)."""
    x, y, x_adv = examples
    info = data_mod.DATASETS[cfg.data.name]
    k, pool, rows, restrict = grid.k, grid.pool, grid.rows, grid.restrict
    x_train, y_train, error = _training_pool(cfg, data_dir, pool)
    if x_train is None:
        return {"skipped": f"training data unavailable: {error}"}
    with evaluating(model):
        clean = class_scores(model, x, batch_size, device).argmax(1)
        adv = class_scores(model, x_adv, batch_size, device).argmax(1)
    misclassified = ((clean == y) & (adv != y)).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(derive_seed(seed, "neighbour-grid") % (2**63))
    chosen = misclassified[torch.randperm(len(misclassified), generator=generator)[:rows]].sort().values
    indices, distances = nearest_training_neighbours(
        model, x_train, y_train, x_adv[chosen], k=k, batch_size=max(batch_size, 1),
        query_classes=adv[chosen] if restrict == "predicted" else None, device=device)
    written = neighbour_grid(x_adv[chosen], y[chosen], adv[chosen], x_train, indices, info.classes,
                             out / "neighbours.png", y_train=y_train, distances=distances,
                             query_ids=[int(i) for i in chosen])
    return {"n_misclassified": len(misclassified), "rows": len(chosen), "k": k, "pool": len(x_train),
            "restricted_to": restrict, "distance": "cosine" if getattr(model, "distance", None) == "cosine" else "l2",
            "png": written["png"], "json": written["json"]}
