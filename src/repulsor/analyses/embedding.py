"""Where a prototype model puts its inputs: embeddings, their 2-D PCA, the prototypes' similarities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import batched, evaluating


def embed_points(model, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """``model.embed`` of images, float32 on the CPU, batched, in eval mode."""
    with evaluating(model):
        return batched(lambda xb: model.embed(xb).float(), x, batch_size=batch_size, device=device)


def pca_2d(z: torch.Tensor):
    """(mean [D], components [2, D], explained variance ratios [2]) of points z [N, D]."""
    mean = z.mean(0)
    _, s, vh = torch.linalg.svd(z - mean, full_matrices=False)
    var = s**2
    ratio = var / var.sum().clamp_min(1e-12)
    comps = vh[:2]
    if comps.shape[0] < 2:  # D = 1: pad with a zero direction
        comps = torch.cat([comps, torch.zeros(2 - comps.shape[0], z.shape[1])])
        ratio = torch.cat([ratio, torch.zeros(2)])
    return mean, comps, ratio[:2]


def project_2d(z: torch.Tensor, prototypes: torch.Tensor, *, normalise: bool) -> dict:
    """The embeddings z [N, D] and the prototypes [k, D] in the plane of z's first two principal
    components: ``points`` [N, 2], ``prototypes`` [k, 2], ``explained_variance`` [2]. With
    ``normalise`` both are first put on the unit sphere (cosine heads decide by direction only)."""
    z, P = z.float(), prototypes.detach().float().cpu()
    if normalise:
        z, P = F.normalize(z, dim=1), F.normalize(P, dim=1)
    mean, comps, ratio = pca_2d(z)
    return {"points": (z - mean) @ comps.T, "prototypes": (P - mean) @ comps.T, "explained_variance": ratio}


def prototype_cosines(prototypes: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities [k, k] of the prototypes [k, D]."""
    P = F.normalize(prototypes.detach().float().cpu(), dim=1)
    return P @ P.T
