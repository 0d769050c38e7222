"""Class prototypes placed far apart before training (Eq. 5 of the paper), and their files.

The paper maximises the sum of pairwise distances by gradient descent. Left unbounded, that
sum only pushes coordinates outward (the authors' code reaches about +-73 for k=10, D=100 and
nearly collinear prototypes for k=100, D=500), so every metric here lives on a bounded set:

- ``cosine``: the unit sphere; minimise, for each prototype, the cosine to its most similar
  neighbour (hyperspherical prototypes, Mettes et al. 2019).
- ``l2``: the unit sphere; maximise, for each prototype, a soft minimum of its L2 distances
  to the others.
- ``linf``: the box [-1, 1]^D (initialised uniformly in it, as the authors do); maximise, for
  each prototype, a soft minimum of its L-inf distances to the others.

Nearest-neighbour objectives raise the *smallest* separation, which is what bounds the margin
between classes; a mean of all distances can grow while two prototypes stay close.

One more metric reproduces the authors' public code for diagnosis, never as a default:

- ``linf_sum``: initialised uniformly in [-1, 1]^D (seeded here; the code is unseeded), then
  plain SGD with momentum 0.9 at a constant step on minus the sum of the L-inf distances of all
  distinct pairs, without any projection. Coordinates grow without bound (about +-77 after
  100 steps for k=10, D=100, the code's "about +-73" up to the unseeded draw).

MMC's prototypes are not searched for: ``mmc_centres`` places them as a regular simplex.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import torch
import torch.nn.functional as F

from .store.files import atomic_write_bytes
from .errors import UserError

METRICS = ("cosine", "l2", "linf", "linf_sum")
UNBOUNDED = ("linf_sum",)  # the authors' code's generation: no projection, no best-iterate choice

# Temperature of the soft minimum, in distance units (distances here lie in [0, 2]). Small
# enough to track the nearest neighbour, large enough that the few next-nearest also push,
# which avoids the zig-zag of a hard minimum that jumps between neighbours.
_SOFTMIN_TAU = 0.03
_MOMENTUM = 0.9
_CPU = torch.device("cpu")

# Metadata keys written by save_prototypes and their types when read back.
_META_TYPES = {"k": int, "D": int, "metric": str, "epochs": int, "lr": float, "seed": int}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate(num_classes, dim, metric, epochs, lr, seed) -> None:
    if not _is_int(num_classes) or num_classes < 2:
        raise UserError(f"prototypes: num_classes must be an integer >= 2, got {num_classes!r}")
    if not _is_int(dim) or dim < 2:
        raise UserError(f"prototypes: dim (the output size D) must be an integer >= 2, got {dim!r}")
    if metric not in METRICS:
        raise UserError(f"prototypes: unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not _is_int(epochs) or epochs < 0:
        raise UserError(f"prototypes: epochs must be an integer >= 0, got {epochs!r}")
    if (not isinstance(lr, numbers.Real) or isinstance(lr, bool)
            or not math.isfinite(float(lr)) or lr <= 0):
        raise UserError(f"prototypes: lr must be a finite number > 0, got {lr!r}")
    if not _is_int(seed):
        raise UserError(f"prototypes: seed must be an integer, got {seed!r}")


def _diagonal_mask(k: int) -> torch.Tensor:
    """Boolean mask [k, k], True on the diagonal (the pairs to leave out)."""
    return torch.eye(k, dtype=torch.bool, device=_CPU)


def _softmin_rows(d: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft minimum of each row of ``d`` [k, k] (diagonal already +inf), shape [k]."""
    return -tau * torch.logsumexp(-d / tau, dim=1)


def _loss(P: torch.Tensor, metric: str) -> torch.Tensor:
    """The quantity to minimise: a sum over prototypes, so each prototype's gradient has unit
    scale whatever k is (a mean would make lr=0.01 a hundred times weaker for k=100)."""
    k = P.shape[0]
    diag = _diagonal_mask(k)
    if metric == "cosine":
        # Normalising inside the loss keeps the gradient tangent to the sphere.
        U = F.normalize(P, dim=1)
        cos = (U @ U.T).masked_fill(diag, -math.inf)
        return cos.amax(dim=1).sum()
    if metric == "l2":
        U = F.normalize(P, dim=1)
        # On the sphere |u - v|^2 = 2 - 2 cos; the clamp keeps sqrt's gradient finite.
        sq = (2.0 - 2.0 * (U @ U.T)).clamp_min(1e-12)
        d = sq.sqrt().masked_fill(diag, math.inf)
    elif metric == "linf_sum":
        # The authors' objective: every distinct pair once, no nearest-neighbour weighting.
        return -torch.triu(torch.cdist(P, P, p=math.inf), diagonal=1).sum()
    else:
        d = torch.cdist(P, P, p=math.inf).masked_fill(diag, math.inf)
    return -_softmin_rows(d, _SOFTMIN_TAU).sum()


def _project(P: torch.Tensor, metric: str) -> torch.Tensor:
    if metric in UNBOUNDED:
        return P
    if metric == "linf":
        return P.clamp(-1.0, 1.0)
    return F.normalize(P, dim=1)


def generate_prototypes(num_classes: int, dim: int, *, metric: str = "linf", epochs: int = 100,
                        lr: float = 0.01, seed: int = 0) -> torch.Tensor:
    """Place ``num_classes`` prototypes in ``dim`` dimensions far apart (Eq. 5, bounded).

    Projected subgradient descent with momentum 0.9 and a cosine-decayed step size; the
    returned iterate is the one with the lowest loss seen, because subgradient steps on a
    nearest-neighbour objective are not monotone. Runs on the CPU in float32 with its own
    generator, so the result depends only on the arguments (not on the global RNG state or
    the default device/dtype).

    Args:
        num_classes: k >= 2, one prototype per class.
        dim: D >= 2, the output size of the network.
        metric: ``"cosine"`` or ``"l2"`` (unit sphere) or ``"linf"`` (box [-1, 1]^D); or
            ``"linf_sum"``, the authors' code's unbounded generation (constant step, no
            projection, the last iterate), for diagnosis only.
        epochs: number of gradient steps (>= 0; 0 returns the random initialisation).
        lr: initial step size (> 0); the paper uses 0.01 for 100 epochs.
        seed: seed of the initialisation.

    Returns:
        Tensor [k, D], float32, on the CPU. Rows have unit L2 norm for cosine and l2;
        every coordinate lies in [-1, 1] for linf; linf_sum is unbounded.
    """
    _validate(num_classes, dim, metric, epochs, lr, seed)
    # The caller may hold no_grad or inference_mode (e.g. inside an evaluation); the descent
    # needs autograd regardless, and tensors made under inference mode could not join it.
    with torch.inference_mode(False), torch.enable_grad():
        gen = torch.Generator(device=_CPU).manual_seed(int(seed))
        shape = (int(num_classes), int(dim))
        if metric in ("linf", "linf_sum"):
            P = torch.rand(shape, generator=gen, dtype=torch.float32, device=_CPU) * 2.0 - 1.0
        else:
            # A normalised Gaussian is uniform on the sphere.
            P = F.normalize(torch.randn(shape, generator=gen, dtype=torch.float32, device=_CPU), dim=1)

        best, best_loss = P, math.inf
        velocity = torch.zeros_like(P)
        unbounded = metric in UNBOUNDED
        for step in range(int(epochs) + 1):
            P = P.detach().requires_grad_(True)
            loss = _loss(P, metric)
            value = float(loss.detach())
            if value < best_loss or unbounded:  # the code keeps its last iterate
                best, best_loss = P.detach(), value
            if step == epochs:
                break
            (grad,) = torch.autograd.grad(loss, P)
            velocity = _MOMENTUM * velocity + grad
            step_size = float(lr) if unbounded else float(lr) * 0.5 * (1.0 + math.cos(math.pi * step / epochs))
            P = _project(P.detach() - step_size * velocity, metric)
    return best.detach().clone()


def mmc_centres(num_classes: int, dim: int, scale: float = 10.0) -> torch.Tensor:
    """Max-Mahalanobis centres: a regular simplex (pairwise cosine -1/(k-1)) scaled to norm ``scale``.

    Returns [k, D] float32; needs D >= k (the simplex lives in the first k coordinates).
    """
    eye = torch.eye(num_classes, dim, dtype=torch.float64)
    centred = eye - eye.mean(dim=0, keepdim=True)
    return (scale * F.normalize(centred, dim=1)).float()


def prototype_stats(P: torch.Tensor) -> dict[str, float]:
    """Separation of a prototype set over its distinct pairs.

    Args:
        P: prototypes [k, D], k >= 2.

    Returns:
        ``{"min_l2", "mean_l2", "min_linf", "mean_linf", "max_cosine"}`` as Python floats.
    """
    if P.dim() != 2 or P.shape[0] < 2:
        raise UserError(f"prototype_stats: need a [k, D] tensor with k >= 2, got shape {tuple(P.shape)}")
    P = P.detach().to(device=_CPU, dtype=torch.float64)
    pairs = ~_diagonal_mask(P.shape[0])
    l2 = torch.cdist(P, P)[pairs]
    linf = torch.cdist(P, P, p=math.inf)[pairs]
    U = F.normalize(P, dim=1)
    cos = (U @ U.T)[pairs]
    return {
        "min_l2": float(l2.min()),
        "mean_l2": float(l2.mean()),
        "min_linf": float(linf.min()),
        "mean_linf": float(linf.mean()),
        "max_cosine": float(cos.max()),
    }


def save_prototypes(path, P: torch.Tensor, meta: dict) -> None:
    """Write prototypes to a safetensors file, atomically.

    Args:
        path: destination file; its folder must exist.
        P: prototypes [k, D] (stored as float32).
        meta: how they were made, usually ``metric, epochs, lr, seed``; stored as strings.
            ``k`` and ``D`` are always taken from ``P``.
    """
    from safetensors.torch import save

    path = Path(path)
    if not torch.is_tensor(P) or P.dim() != 2:
        raise UserError(f"save_prototypes: prototypes must be a [k, D] tensor, got {type(P).__name__}"
                        f"{' of shape ' + str(tuple(P.shape)) if torch.is_tensor(P) else ''}")
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise UserError(f"cannot write prototypes to {path}: folder {path.parent} {what}")
    metadata = {str(key): str(value) for key, value in dict(meta or {}).items()}
    metadata["k"], metadata["D"] = str(P.shape[0]), str(P.shape[1])
    data = save({"prototypes": P.detach().to(device=_CPU, dtype=torch.float32).contiguous()},
                metadata=metadata)
    atomic_write_bytes(path, data)


def load_prototypes(path) -> tuple[torch.Tensor, dict]:
    """Read prototypes written by :func:`save_prototypes`.

    Args:
        path: a safetensors file holding a ``"prototypes"`` tensor.

    Returns:
        ``(P, meta)``: P float32 [k, D] on the CPU; meta with ``k, D, epochs, seed`` as int,
        ``lr`` as float, other values as the strings stored.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"prototype file {path} does not exist; generate it with repulsor.prototypes.save_prototypes")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
            raw_meta = handle.metadata() or {}
            P = handle.get_tensor("prototypes") if "prototypes" in names else None
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"prototype file {path} is not a readable safetensors file ({first_line}); "
                        "regenerate it") from None
    if P is None:
        raise UserError(f"prototype file {path} has no 'prototypes' tensor (found: {', '.join(names) or 'none'}); "
                        "regenerate it")
    if P.dim() != 2 or not P.is_floating_point():
        raise UserError(f"prototype file {path} holds a {P.dtype} tensor of shape {tuple(P.shape)}; "
                        "expected a float [k, D] tensor; regenerate it")
    meta: dict = {}
    for key, value in raw_meta.items():
        kind = _META_TYPES.get(key, str)
        try:
            meta[key] = kind(value)
        except ValueError:
            raise UserError(f"prototype file {path}: metadata {key}={value!r} is not a valid {kind.__name__}; "
                            "regenerate it") from None
    return P.to(torch.float32), meta


def check_prototypes(P: torch.Tensor, num_classes: int, dim: int, path="the prototype tensor") -> None:
    """Raise UserError unless ``P`` has shape [num_classes, dim].

    Args:
        P: prototypes [k, D].
        num_classes: k the model needs.
        dim: D the model needs.
        path: where ``P`` came from, for the message.
    """
    shape = tuple(P.shape)
    if shape != (num_classes, dim):
        found = f"k={shape[0]}, D={shape[1]}" if len(shape) == 2 else f"shape {shape}"
        raise UserError(f"prototypes in {path} have {found}; the model needs k={num_classes}, D={dim}; "
                        "regenerate them or change the model's output size")
