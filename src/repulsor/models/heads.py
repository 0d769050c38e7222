"""From a body to a classifier: input normalisation, the plain network, the prototype head.

Every model built here takes images in [0, 1] (NCHW) and returns one score per class, higher
meaning more likely, so any attack can treat it as a black box of logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

# The decision rules of a prototype head. The first four classify by the nearest (or most
# similar) prototype; the ``dot_*`` rules are the authors' code's (``hyper_proto.py``): the output
# normalised in L-inf (``dot_linf``, its "inf" setting) or L2 (``dot_l2``, its "mean" setting),
# then its dot product with the *unnormalised* prototypes, which is neither the nearest prototype
# nor what that code's attack maximises. They are here to reproduce that code, never as defaults.
DISTANCES = ("cosine", "l2", "linf", "sqeuclid", "dot_linf", "dot_l2")


def rule_scores(z: torch.Tensor, prototypes: torch.Tensor, rule: str) -> torch.Tensor:
    """Class scores [N, k] (float32, higher = more likely) of embeddings ``z`` [N, D] under the
    decision rule ``rule`` (one of ``DISTANCES``) with prototypes [k, D].

    Computed in float32 with autocast off: distances between nearby points in bf16 lose most of
    their digits, and attacks need their gradients.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, P = z.float(), prototypes.float()
        if rule == "cosine":
            return F.normalize(z, dim=1) @ F.normalize(P, dim=1).T
        if rule == "dot_linf":
            return F.normalize(z, p=math.inf, dim=1) @ P.T
        if rule == "dot_l2":
            return F.normalize(z, dim=1) @ P.T
        if rule == "l2":
            return -torch.cdist(z, P)
        if rule == "linf":
            return -torch.cdist(z, P, p=math.inf)
        if rule == "sqeuclid":
            # The expanded form has the exact gradient 2 (p - z) and no square root.
            return -((z * z).sum(1, keepdim=True) - 2.0 * (z @ P.T) + (P * P).sum(1))
    raise UserError(f"unknown prototype rule {rule!r}; use one of {', '.join(DISTANCES)}")


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, the first layer of every model.

    Args:
        mean: per-channel means, length C.
        std: per-channel standard deviations, length C, all > 0.

    Input and output [N, C, H, W]. ``mean`` and ``std`` are buffers of shape [1, C, 1, 1],
    so they travel with the model (device, state dict) but are never trained.
    """

    def __init__(self, mean, std):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise UserError(f"Normalize: mean and std need one value per channel, got {mean_t.numel()} "
                            f"and {std_t.numel()}")
        if not bool((std_t > 0).all()) or not bool(torch.isfinite(mean_t).all()):
            raise UserError(f"Normalize: std must be > 0 and mean finite, got mean={mean_t.tolist()} "
                            f"std={std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Network(nn.Module):
    """Normalisation followed by a body: [0, 1] images [N, C, H, W] -> [N, out_dim].

    A plain cross-entropy classifier is a ``Network`` whose body has out_dim = k.
    """

    def __init__(self, normalize: Normalize, body: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


class PrototypeClassifier(nn.Module):
    """Classify by similarity of the network's output to fixed class prototypes.

    Args:
        network: maps [0, 1] images [N, C, H, W] to embeddings [N, D].
        prototypes: [k, D], kept fixed (a buffer, saved in the state dict, never trained).
        distance: the decision rule: ``cosine`` (cosine similarity), ``l2`` / ``linf`` (negative
            L2 / L-inf distance), ``sqeuclid`` (negative squared L2, as in Max-Mahalanobis
            centres), or the authors' code's ``dot_linf`` / ``dot_l2`` (see ``DISTANCES``).

    ``forward(x)`` returns scores [N, k]; its argmax is the nearest (or most similar)
    prototype, so attacks on the scores attack the actual decision rule.
    """

    def __init__(self, network: nn.Module, prototypes: torch.Tensor, distance: str):
        super().__init__()
        if distance not in DISTANCES:
            raise UserError(f"unknown prototype distance {distance!r}; use one of {', '.join(DISTANCES)}")
        if not torch.is_tensor(prototypes) or prototypes.dim() != 2 or prototypes.shape[0] < 2:
            shape = tuple(prototypes.shape) if torch.is_tensor(prototypes) else type(prototypes).__name__
            raise UserError(f"prototypes must be a [k, D] tensor with k >= 2, got {shape}")
        self.network = network
        self.distance = distance
        self.register_buffer("prototypes", prototypes.detach().to(torch.float32).clone())

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of images: [N, C, H, W] in [0, 1] -> [N, D] (dtype of the network)."""
        return self.network(x)

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """Class scores of embeddings: [N, D] -> [N, k] float32, higher = closer (``rule_scores``)."""
        return rule_scores(z, self.prototypes, self.distance)

    def distances(self, scores: torch.Tensor) -> torch.Tensor:
        """The distances d(z, p_j) [N, k] behind ``scores(z)``, lower = closer: 1 - cosine
        similarity for ``cosine``, the distance itself for the others (minus the score for the
        ``dot_*`` rules, whose scores are no distance). Attacks in
        representation space read them here, so they attack the decision rule itself."""
        return 1 - scores if self.distance == "cosine" else -scores

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        """Scores [N, k]; with ``return_embedding``, also the embeddings [N, D].

        Training methods that need both (TRADES-style prototypes) get them from one call,
        so a DistributedDataParallel wrapper sees a single forward.
        """
        z = self.embed(x)
        return (self.scores(z), z) if return_embedding else self.scores(z)

    def extra_repr(self) -> str:
        k, D = self.prototypes.shape
        return f"k={k}, D={D}, distance={self.distance!r}"
