"""Training methods: each one is a loss function plugged into the one training loop.

A method's ``loss(ctx, x, y)`` returns ``(loss, scores, passes)``: the scalar loss to
minimise, the class scores of the clean batch (detached, for training accuracy), and a
``Passes`` record of how many forward and backward passes of the network each example
cost, so that training cost is accounted for rather than asserted.

``ctx.model`` is the network to train through (possibly wrapped in DistributedDataParallel);
``ctx.raw_model`` is the same network unwrapped, which attacks use because they only need
input gradients and must not trigger DDP's gradient synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from ..attacks import pgd
from ..certify import ibp_margins
if TYPE_CHECKING:  # config checks method names against METHODS: no import at run time
    from ..config import TrainConfig


@dataclass(frozen=True)
class Passes:
    """Network passes per training example in one step (forward, backward)."""

    forward: int
    backward: int


@dataclass
class TrainContext:
    model: torch.nn.Module
    raw_model: torch.nn.Module
    cfg: TrainConfig
    seed: int = 0  # a fresh seed per step, for random starts of training-time attacks
    progress: float = 0.0  # the fraction of training done before this step (schedules of certified training)


@dataclass(frozen=True)
class Method:
    """A training method: its loss and the head it needs.

    ``head`` is ``"linear"`` (k logits), ``"prototype"`` (D outputs compared with fixed
    prototypes) or ``"pcl"`` (k logits, plus learned centres in hidden spaces for training).
    ``distance`` fixes the prototype distance for methods that define it (MMC: negative
    squared L2; HPN: cosine); None means ``prototypes.distance``.
    ``prototypes`` is ``"repulsive"`` (Eq. 5) or ``"mmc"`` (Max-Mahalanobis centres).
    ``options`` names the ``train`` settings that matter to this method only; a run of another
    method ignores them (``repulsor compare`` does not ask to retrain it when they change).
    """

    name: str
    loss: Callable
    head: str = "linear"
    distance: str | None = None
    prototypes: str = "repulsive"
    watch_overfitting: bool = False
    summary: str = ""
    options: tuple[str, ...] = ()  # train.* keys that only this method (and its kin) reads

    @property
    def uses_prototypes(self) -> bool:
        return self.head == "prototype"


def prototype_objective(scores: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-example prototype loss from the model's own class scores.

    For ``cosine`` the scores are cos(f(x), p_j) and the loss is Eq. 6 of the paper,
    (1 - cos(f(x), p_y))^2. For the distance heads (``l2``, ``linf``, ``sqeuclid``) the
    scores are negative distances and the loss is the distance to the true prototype:
    ``linf`` is what the authors' code trained with, ``sqeuclid`` is the MMC loss.
    Computing it from the scores keeps the loss and the decision rule consistent.
    """
    true_score = scores.float().gather(1, y[:, None]).squeeze(1)
    if distance == "cosine":
        return (1 - true_score) ** 2
    return -true_score


def _distance(ctx: TrainContext) -> str:
    return ctx.raw_model.distance


# The training losses of a prototype head (``train.objective``): the one its decision rule defines,
# and the two of the authors' code (``hyper_proto.py``), named for what they compute.
OBJECTIVES = ("rule", "linf_distance", "batch_cosine")


def prototype_batch_loss(ctx: TrainContext, scores: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The scalar prototype loss of a batch under ``train.objective``.

    - ``rule``: ``prototype_objective`` of the head's own scores, averaged over the batch.
    - ``linf_distance`` (the code's "inf"): the batch mean of ``||z_i - p_{y_i}||_inf``, the raw
      output against the raw (unnormalised) prototype.
    - ``batch_cosine`` (the code's "mean"): ``1 - cos`` between the output and the true
      prototypes taken *over the batch dimension*, one cosine per output coordinate between
      the column z[:, d] and the column p_y[:, d] across the batch, averaged over coordinates.
      Not Eq. 6's per-example cosine: each example's loss depends on the rest of its batch.
    """
    objective = ctx.cfg.objective
    if objective == "rule":
        return prototype_objective(scores, y, _distance(ctx)).mean()
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, target = z.float(), ctx.raw_model.prototypes.float()[y]
        if objective == "linf_distance":
            return (z - target).abs().amax(dim=1).mean()
        return (1 - F.cosine_similarity(z, target, dim=0)).mean()


def _attack(ctx: TrainContext, x, y, *, loss, early_stop=False):
    """Training-time PGD at the configured threat model (no restarts, every step on every point)."""
    cfg = ctx.cfg
    return pgd(
        ctx.raw_model, x, y, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, norm=cfg.norm,
        loss=loss, restarts=1, random_start=True, early_stop=early_stop, seed=ctx.seed,
    ).detach()


def _cross_entropy(ctx: TrainContext, scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the class scores, with ``train.label_smoothing`` (0 = none)."""
    return F.cross_entropy(scores.float(), y, label_smoothing=ctx.cfg.label_smoothing)


def ce_loss(ctx: TrainContext, x, y):
    """Cross-entropy on clean inputs: the paper's Regular baseline."""
    scores = ctx.model(x)
    return _cross_entropy(ctx, scores, y), scores.detach(), Passes(1, 1)


def prototype_loss(ctx: TrainContext, x, y):
    """Repulsive prototypes (Eq. 6 for cosine; distance to p_y for l2/linf; or ``train.objective``).
    Clean inputs only."""
    scores, z = ctx.model(x, return_embedding=True)
    return prototype_batch_loss(ctx, scores, z, y), scores.detach(), Passes(1, 1)


def pgd_at_loss(ctx: TrainContext, x, y):
    """Madry et al. 2018: cross-entropy on PGD examples (random start, ``attack_steps`` steps)."""
    x_adv = _attack(ctx, x, y, loss="ce")
    scores = ctx.model(x_adv)
    steps = ctx.cfg.attack_steps
    return _cross_entropy(ctx, scores, y), scores.detach(), Passes(steps + 1, steps + 1)


def fgsm_rs_loss(ctx: TrainContext, x, y):
    """Wong et al. 2020: one FGSM step of ``fgsm_alpha * eps`` from a uniform random start."""
    cfg = ctx.cfg
    x_adv = pgd(
        ctx.raw_model, x, y, eps=cfg.eps, alpha=cfg.fgsm_alpha * cfg.eps, steps=1, norm=cfg.norm,
        loss="ce", restarts=1, random_start=True, early_stop=False, seed=ctx.seed,
    ).detach()
    scores = ctx.model(x_adv)
    return _cross_entropy(ctx, scores, y), scores.detach(), Passes(2, 2)


def _kl_to(clean_probs: torch.Tensor):
    """An attack loss: KL(p_clean || p(x_adv)) per example, as in TRADES' inner maximisation."""

    def loss(model, x_adv, y, target=None):
        scores = model(x_adv).float()
        kl = F.kl_div(F.log_softmax(scores, dim=1), clean_probs, reduction="none").sum(dim=1)
        return kl, scores

    return loss


def trades_loss(ctx: TrainContext, x, y):
    """Zhang et al. 2019: CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv maximising the KL."""
    with torch.no_grad():
        clean_probs = F.softmax(ctx.raw_model(x).float(), dim=1)
    x_adv = _attack(ctx, x, y, loss=_kl_to(clean_probs))
    scores = ctx.model(torch.cat([x, x_adv]))
    clean, adv = scores[: len(x)].float(), scores[len(x) :].float()
    robust = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
    steps = ctx.cfg.attack_steps
    loss = _cross_entropy(ctx, clean, y) + ctx.cfg.trades_beta * robust
    return loss, clean.detach(), Passes(steps + 3, steps + 2)


def _embedding_gap_to(clean_embedding: torch.Tensor):
    """An attack loss: 1 - cos(f(x_adv), f(x)) per example (TRADES' KL, moved to the output space)."""

    def loss(model, x_adv, y, target=None):
        z = model.embed(x_adv).float()
        return 1 - F.cosine_similarity(z, clean_embedding, dim=1), model.scores(z)

    return loss


def prototype_at_loss(ctx: TrainContext, x, y):
    """Prototype loss on PGD examples that maximise the CW margin of the prototype scores."""
    x_adv = _attack(ctx, x, y, loss="cw")
    scores, z = ctx.model(x_adv, return_embedding=True)
    steps = ctx.cfg.attack_steps
    return prototype_batch_loss(ctx, scores, z, y), scores.detach(), Passes(steps + 1, steps + 1)


def prototype_trades_loss(ctx: TrainContext, x, y):
    """TRADES-style prototypes: prototype loss on x + beta * (1 - cos(f(x), f(x_adv)))."""
    with torch.no_grad():
        clean_embedding = ctx.raw_model.embed(x).float()
    x_adv = _attack(ctx, x, y, loss=_embedding_gap_to(clean_embedding))
    # One forward through ctx.model (so DDP sees it) that also returns the embeddings.
    scores, z = ctx.model(torch.cat([x, x_adv]), return_embedding=True)
    n = len(x)
    gap = 1 - F.cosine_similarity(z[:n].float(), z[n:].float(), dim=1)
    loss = prototype_batch_loss(ctx, scores[:n], z[:n], y) + ctx.cfg.trades_beta * gap.mean()
    steps = ctx.cfg.attack_steps
    return loss, scores[:n].detach(), Passes(steps + 3, steps + 2)


def conformity_loss(features: torch.Tensor, centres: torch.Tensor, y: torch.Tensor, push: float) -> torch.Tensor:
    """Mustafa et al.'s prototype conformity loss in one space, averaged over the batch.

    ``(||f - w_y||^2 - push / (k - 1) * sum_{j != y} (||f - w_j||^2 + ||w_y - w_j||^2)) / d``
    with features f [N, d] and learned centres w [k, d]: pull each feature to its class centre,
    push it and its centre away from the other classes' centres. Computed in float32.

    Dividing by d (a per-coordinate squared error) is ours: the sum over d coordinates makes
    the curvature of a linear projection's weights grow with d, and SGD at the learning rates
    that train cross-entropy diverges on it. Mustafa et al.'s sum is ``pcl_weight = d``.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        f, w = features.float(), centres.float()
        k = w.shape[0]
        to_centres = (f * f).sum(1, keepdim=True) - 2.0 * (f @ w.T) + (w * w).sum(1)  # [N, k]
        own = F.one_hot(y, k).bool()
        pull = to_centres[own]
        w_y = w[y]
        between = (w_y * w_y).sum(1, keepdim=True) - 2.0 * (w_y @ w.T) + (w * w).sum(1)  # [N, k]
        others = (to_centres + between).masked_fill(own, 0.0).sum(1) / (k - 1)
        return (pull - push * others).mean() / w.shape[1]


def _pcl_objective(ctx: TrainContext, x, y):
    """Cross-entropy plus the conformity loss of every hidden space, on the batch ``x``."""
    scores, features = ctx.model(x, return_features=True)
    centres = ctx.raw_model.centres
    pc = sum(conformity_loss(f, c, y, ctx.cfg.pcl_push) for f, c in zip(features, centres))
    return _cross_entropy(ctx, scores, y) + ctx.cfg.pcl_weight * pc, scores


def pcl_loss(ctx: TrainContext, x, y):
    """Mustafa et al. 2019 without adversarial examples: CE + PC loss of each hidden space."""
    loss, scores = _pcl_objective(ctx, x, y)
    return loss, scores.detach(), Passes(1, 1)


def pcl_at_loss(ctx: TrainContext, x, y):
    """Mustafa et al.'s adversarial phase: the PCL objective on clean and PGD (CE) examples together."""
    x_adv = _attack(ctx, x, y, loss="ce")
    loss, scores = _pcl_objective(ctx, torch.cat([x, x_adv]), torch.cat([y, y]))
    steps = ctx.cfg.attack_steps
    return loss, scores[:len(x)].detach(), Passes(steps + 2, steps + 2)


def ibp_schedule(cfg, progress: float) -> tuple[float, float]:
    """``(eps, kappa)`` of IBP training at ``progress`` (Gowal et al. 2018): eps 0 for the first
    ``ibp_warmup`` of training, then rising linearly to ``train.eps`` over the next ``ibp_ramp``, while the
    weight kappa of the clean loss falls from 1 to 0.5."""
    ramp = min(1.0, max(0.0, (progress - cfg.ibp_warmup) / cfg.ibp_ramp))
    return cfg.eps * ramp, 1.0 - 0.5 * ramp


def ibp_loss(ctx: TrainContext, x, y):
    """Interval bound propagation (Gowal et al. 2018): kappa * CE(f(x), y) + (1 - kappa) * CE(z, y), z the
    worst-case logits the interval bounds allow (0 for the true class, minus each margin's lower bound for
    the others) over the eps-ball of the schedule (``ibp_schedule``)."""
    eps, kappa = ibp_schedule(ctx.cfg, ctx.progress)
    scores = ctx.model(x)
    clean = _cross_entropy(ctx, scores, y)
    if eps == 0:
        return clean, scores.detach(), Passes(1, 1)
    margins = ibp_margins(ctx.raw_model, x, y, eps).float()  # [N, k-1]
    worst = torch.cat([torch.zeros_like(margins[:, :1]), -margins], dim=1)  # the true class first
    robust = F.cross_entropy(worst, torch.zeros_like(y))
    return kappa * clean + (1 - kappa) * robust, scores.detach(), Passes(3, 3)


METHODS: dict[str, Method] = {}


def _register(method: Method) -> None:
    METHODS[method.name] = method


# Settings read by every method whose loss is cross-entropy (and by no other).
_CE = ("label_smoothing",)

_register(Method("ce", ce_loss, summary="cross-entropy on clean inputs (the paper's Regular run)", options=_CE))
_PROTO = ("objective",)  # read by every prototype-head method

_register(Method("prototype", prototype_loss, head="prototype",
                 summary="repulsive prototypes, clean inputs only (the paper's method)", options=_PROTO))
_register(Method("hpn", prototype_loss, head="prototype", distance="cosine",
                 summary="hyperspherical prototype networks (Mettes et al.): cosine prototypes, Eq. 6", options=_PROTO))
_register(Method("mmc", prototype_loss, head="prototype", distance="sqeuclid", prototypes="mmc",
                 summary="Max-Mahalanobis centres (Pang et al.): loss ||z - mu_y||^2", options=_PROTO))
_register(Method("pgd_at", pgd_at_loss, summary="PGD adversarial training (Madry et al.)",
                 options=_CE))
_register(Method("trades", trades_loss, summary="TRADES (Zhang et al.)",
                 options=("trades_beta", *_CE)))
_register(Method("fgsm_rs", fgsm_rs_loss, watch_overfitting=True,
                 summary="fast FGSM training with random start (Wong et al.)",
                 options=("fgsm_alpha", "overfit_drop", *_CE)))
_register(Method("prototype_at", prototype_at_loss, head="prototype",
                 summary="prototype loss on PGD examples", options=_PROTO))
_register(Method("pcl", pcl_loss, head="pcl",
                 summary="prototype conformity loss (Mustafa et al.): CE + learned centres in hidden spaces",
                 options=("pcl_weight", "pcl_push", *_CE)))
_register(Method("pcl_at", pcl_at_loss, head="pcl",
                 summary="prototype conformity loss on clean and PGD examples (Mustafa et al.)",
                 options=("pcl_weight", "pcl_push", *_CE)))
_register(Method("ibp", ibp_loss, summary="interval bound propagation: certified training (Gowal et al.)",
                 options=("ibp_warmup", "ibp_ramp", *_CE)))
_register(Method("prototype_trades", prototype_trades_loss, head="prototype",
                 summary="prototype loss + beta * (1 - cos(f(x), f(x_adv))), TRADES-style",
                 options=("trades_beta", *_PROTO)))

