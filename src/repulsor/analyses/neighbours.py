"""Nearest correctly classified training samples of misclassified adversarial examples, in
representation space (Figure 5c)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import data as data_mod
from ..attacks import evaluating
from ..errors import UserError
from ..plots.images import neighbour_grid
from ..runtime import derive_seed
from .scores import check_pair, class_scores, device_of


def representation(model, x: torch.Tensor, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
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
    check_pair(x_train, y_train, "x_train")
    if not torch.is_tensor(x_query) or x_query.dim() != 4:
        raise UserError("x_query must be images [Q, C, H, W]")
    if k < 1:
        raise UserError(f"k must be >= 1; got {k}")
    device = device_of(model, device)
    with evaluating(model):
        z_train, pred_train = representation(model, x_train, batch_size, device)
        z_query, _ = representation(model, x_query, batch_size, device)
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


def training_pool(cfg, data_dir, size: int):
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


@dataclass(frozen=True)
class NeighbourGrid:
    """The neighbour grid's settings: ``k`` neighbours per row, searched among the first ``pool``
    training images, ``rows`` misclassified adversarial examples, neighbours ``restrict``-ed to
    the ``predicted`` (wrong) class or taken from ``all`` classes."""

    k: int = 5
    pool: int = 5000
    rows: int = 8
    restrict: str = "predicted"


def find_neighbours(model, cfg, examples: tuple, grid: NeighbourGrid, *, data_dir, seed: int, batch_size: int,
                    device) -> dict:
    """Figure 5c's numbers for ``examples`` = ``(x, y, x_adv)``: up to ``grid.rows`` misclassified
    adversarial examples (a seeded sample of those whose clean point was correct) and their
    nearest training samples, with just the training images the grid shows.

    Returns ``{"skipped": reason}`` without training data, else: ``queries`` [Q, C, H, W],
    ``y`` and ``pred`` [Q], ``query_ids`` [Q] (test indices), ``indices`` [Q, k] into
    ``train_images`` [M, C, H, W] (-1: none), ``train_labels`` and ``train_ids`` [M] (rows of
    the training split), ``distances`` [Q, k], and the counts ``n_misclassified``, ``rows``,
    ``k``, ``pool``, ``restricted_to``, ``distance``.
    """
    x, y, x_adv = examples
    x_train, y_train, error = training_pool(cfg, data_dir, grid.pool)
    if x_train is None:
        return {"skipped": f"training data unavailable: {error}"}
    with evaluating(model):
        clean = class_scores(model, x, batch_size, device).argmax(1)
        adv = class_scores(model, x_adv, batch_size, device).argmax(1)
    misclassified = ((clean == y) & (adv != y)).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(derive_seed(seed, "neighbour-grid") % (2**63))
    chosen = misclassified[torch.randperm(len(misclassified), generator=generator)[:grid.rows]].sort().values
    indices, distances = nearest_training_neighbours(
        model, x_train, y_train, x_adv[chosen], k=grid.k, batch_size=max(batch_size, 1),
        query_classes=adv[chosen] if grid.restrict == "predicted" else None, device=device)
    shown = indices[indices >= 0].unique()
    compact = torch.full_like(indices, -1)
    compact[indices >= 0] = torch.searchsorted(shown, indices[indices >= 0])
    return {"queries": x_adv[chosen], "y": y[chosen], "pred": adv[chosen], "query_ids": chosen,
            "indices": compact, "train_images": x_train[shown], "train_labels": y_train[shown], "train_ids": shown,
            "distances": distances, "n_misclassified": len(misclassified), "rows": len(chosen), "k": grid.k,
            "pool": len(x_train), "restricted_to": grid.restrict,
            "distance": "cosine" if getattr(model, "distance", None) == "cosine" else "l2"}


def draw_neighbours(found: dict, class_names, path) -> dict:
    """Draw ``find_neighbours``' grid to ``path`` (PNG, and its rows as JSON)."""
    return neighbour_grid(found["queries"], found["y"], found["pred"], found["train_images"], found["indices"],
                          class_names, path, y_train=found["train_labels"], distances=found["distances"],
                          query_ids=[int(i) for i in found["query_ids"]], train_ids=found["train_ids"].tolist())


NEIGHBOUR_COUNTS = ("n_misclassified", "rows", "k", "pool", "restricted_to", "distance")
