"""The authors' evaluation paths as diagnostic protocols: flawed protocols reproduced on purpose.

Serban et al.'s public code scored its models along three paths (``shared/notes/prior-art.md``,
section 2, with file and line). Each is reproduced here as data, a ``Protocol`` of switches, and
run by the one PGD (``attacks.pgd``); no second attack loop. They exist to find out where the
paper's numbers come from. None of them measures robustness: they are not suites, never a
default, and every name and record says "diagnostic". Robustness is what ``standard`` and
``adaptive`` measure.

The switches, each a quirk of the code where it differs from a sound evaluation:

- ``random_start``: sound True. Path A (the PGD run during training) starts at the clean image.
- ``fp16``: sound False. Gradients of the code's scalar loss (a batch mean, not scaled up) through
  the network in float16 (apex O2 with a static loss scale of 1): small gradients underflow to
  zero and their pixels do not move. Emulated on any device (``HalfStorage``): weights (batch norm
  excepted, as O2 keeps it in fp32), the input, every layer's output and every gradient flowing
  back through them are rounded to float16, each operation computing in float32 as a GPU's fp16
  kernels accumulate. A CPU without native fp16 would run real fp16 10-15x slower than fp32.
- ``eps_space``: sound "pixel". Path B adds eps in normalised units (8/255 of a standard
  deviation, about 2/255 of a pixel).
- ``clamp_space``: sound "pixel". Path B clamps to [0, 1] in normalised units: every normalised
  value outside [0, 1] is replaced (a pixel darker than the mean becomes the mean).
- ``mismatch``: sound False. Path B's loader normalises, and a body trained on raw pixels gets the
  normalised values. (A model trained on normalised inputs gets what it was trained on: no effect.)
- ``code_rule``: sound False. Accuracy is scored with the rule of the attack's loss setting (the
  output normalised in L-inf for "inf", L2 for "mean", dotted with the raw prototypes), not with
  the model's own rule.
- ``per_batch``: sound False. Accuracy is a mean of per-batch accuracies (the last, smaller batch
  weighs as a full one).
- ``source_unnormalised`` (transfer only): sound False. The cross-entropy source model, trained on
  normalised inputs, is fed raw pixels while it crafts the examples.

Besides its switches, every path runs as the code did: PGD-20, step eps/4, one run, every step on
every point, the final iterate kept, the batch of 128 over which the loss is averaged (or, for the
"mean" setting, computed). The attack's loss is a setting of the call: ``inf`` (the L-inf
distance of the raw output to the true prototype), ``mean`` (1 - cosine over the batch dimension)
or, for a model without prototypes, ``ce``.

Departure, stated: where path B's clamp binds, the code takes its first gradient at the unclamped
normalised image; here PGD starts from the middle of each coordinate's feasible interval (the clean
value wherever the clamp does not bind), and a random start is uniform in that interval.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import evaluating, pgd
from ..errors import UserError
from ..models.heads import rule_scores
from ..runtime import derive_seed

# Every diagnostic name carries this prefix, so no table can mistake it for a suite.
PREFIX = "diagnostic:"
SOUND = {"random_start": True, "fp16": False, "eps_space": "pixel", "clamp_space": "pixel", "mismatch": False,
         "code_rule": False, "per_batch": False, "source_unnormalised": False}
QUIRKS = tuple(SOUND)
LOSS_SETTINGS = ("inf", "mean", "ce")
CODE_RULES = {"inf": "dot_linf", "mean": "dot_l2"}  # the rule that goes with each loss setting


@dataclass(frozen=True)
class Protocol:
    """One of the code's evaluation paths: its switches (see the module docstring) and its PGD."""

    name: str
    summary: str
    random_start: bool
    fp16: bool
    eps_space: str = "pixel"
    clamp_space: str = "pixel"
    mismatch: bool = False
    code_rule: bool = True
    per_batch: bool = True
    transfer: bool = False
    source_unnormalised: bool = False
    steps: int = 20
    alpha_over_eps: float = 0.25
    batch_size: int = 128

    def quirks(self) -> tuple[str, ...]:
        """The switches at which this path departs from a sound evaluation."""
        return tuple(q for q in QUIRKS if getattr(self, q) != SOUND[q] and (self.transfer or q != "source_unnormalised"))

    def without(self, off) -> Protocol:
        """This path with the quirks named in ``off`` set to their sound values."""
        present = self.quirks()
        for quirk in off:
            if quirk not in present:
                raise UserError(f"{self.name} has no quirk {quirk!r} to switch off; its quirks are {', '.join(present)}")
        return replace(self, **{q: SOUND[q] for q in off})


PROTOCOLS = {p.name: p for p in (
    Protocol(PREFIX + "authors-path-a", "the PGD the authors' training script ran on the test set each epoch",
             random_start=False, fp16=True),
    Protocol(PREFIX + "authors-path-b", "the authors' test script (cleverhans-style PGD on normalised inputs)",
             random_start=True, fp16=True, eps_space="normalised", clamp_space="normalised", mismatch=True),
    Protocol(PREFIX + "authors-transfer", "the authors' transfer script: CE PGD-20 on a cross-entropy model fed raw"
             " pixels, scored on the prototype model", random_start=True, fp16=False, transfer=True,
             source_unnormalised=True),
)}


def get_protocol(name: str) -> Protocol:
    key = name if name.startswith(PREFIX) else PREFIX + name
    if key not in PROTOCOLS:
        raise UserError(f"unknown diagnostic protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[key]


def _to_half(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 (values below 2**-24 become 0, as in an fp16 tensor), kept in float32."""
    return t.half().float()


def _round_gradient(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t.register_hook(_to_half)
    return t


class HalfStorage(nn.Module):
    """A network as apex O2 runs it, emulated: a copy whose weights (batch norm excepted) are rounded
    to float16, whose input and every leaf module's output are rounded to float16 on the way forward,
    and whose gradients are rounded to float16 at the same places on the way back."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = copy.deepcopy(network)
        with torch.no_grad():
            for module in self.network.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    continue
                for param in module.parameters(recurse=False):
                    param.copy_(_to_half(param))
        for module in self.network.modules():
            if not list(module.children()):
                module.register_forward_hook(lambda _m, _i, out: _round_gradient(_to_half(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(_round_gradient(_to_half(x)))


class View(nn.Module):
    """A model as one of the code's paths sees it, on the attack's variable ``v`` [N, C, H, W].

    ``v`` is the normalised image when the path clamps in normalised units, else the pixels.
    The body gets the normalised values under ``mismatch``, else what the model's own first
    layer makes of the pixels. ``forward`` returns the scores of ``rule`` (None: the model's own
    scores); ``embed`` the body's output, for the prototype losses.
    """

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, *, normalised: bool, mismatch: bool,
                 rule: str | None, fp16: bool = False):
        super().__init__()
        self.model, self.normalised, self.mismatch, self.rule = model, normalised, mismatch, rule
        self.network = model.network if hasattr(model, "network") else model
        if not hasattr(self.network, "body") or not hasattr(self.network, "normalize"):
            raise UserError(f"a diagnostic protocol needs a model built as normalisation + body; {type(model).__name__}"
                            " is not one")
        self.body = HalfStorage(self.network.body) if fp16 else self.network.body
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    @property
    def prototypes(self) -> torch.Tensor:
        return self.model.prototypes

    def body_input(self, v: torch.Tensor) -> torch.Tensor:
        if self.mismatch:
            return v if self.normalised else (v - self.mean) / self.std
        pixels = v * self.std + self.mean if self.normalised else v
        return self.network.normalize(pixels)

    def embed(self, v: torch.Tensor) -> torch.Tensor:
        return self.body(self.body_input(v))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        out = self.embed(v).float()
        if not hasattr(self.model, "prototypes"):
            return out
        return rule_scores(out, self.model.prototypes, self.rule or self.model.distance)


def _code_loss(setting: str):
    """The code's scalar attack loss, returned as per-example shares that sum to it (the one PGD
    sums per-example losses): so its gradient is the code's, at the code's scale, which matters
    only in fp16, where small gradients underflow."""

    def loss(view, v, y, target=None):
        n = len(y)
        if setting == "ce":
            scores = view(v)
            return F.cross_entropy(scores, y, reduction="none") / n, scores
        z = view.embed(v).float()
        target_p = view.prototypes.float()[y]
        scores = rule_scores(z, view.prototypes, view.rule or view.model.distance)
        if setting == "inf":
            return (z - target_p).abs().amax(dim=1) / n, scores
        share = (1 - F.cosine_similarity(z, target_p, dim=0)).mean() / n
        return share.expand(n), scores

    return loss


def code_ball(fed: torch.Tensor, radius: torch.Tensor):
    """The code's projection, clip(clip(v, fed - radius, fed + radius), 0, 1), as a centre in
    [0, 1] and a radius per coordinate for the one PGD, plus each coordinate's feasible interval
    [a, b]. Where ``fed`` lies in [0, 1] the centre is ``fed`` and the radius ``radius`` (PGD's own
    projection is then the code's). Elsewhere (normalised values outside [0, 1]) the interval is
    the part of the ball inside the box, or the nearest box edge where the two do not meet, and
    PGD gets its middle and half width: the same projection, from another first iterate."""
    low, high = fed - radius, fed + radius
    a = torch.where(low > 1, torch.ones_like(low), low.clamp(0, 1))
    b = torch.where(high < 0, torch.zeros_like(high), high.clamp(0, 1))
    inside = (fed >= 0) & (fed <= 1)
    centre = torch.where(inside, fed, (a + b) / 2)
    half = torch.where(inside, radius, (b - a) / 2)
    return centre, half, a, b


def _accuracy(correct: torch.Tensor, per_batch: bool, batch_size: int) -> float:
    if not per_batch:
        return correct.float().mean().item()
    return torch.stack([c.float().mean() for c in correct.split(batch_size)]).mean().item()


def _check(model, protocol: Protocol, loss: str, mean, surrogate) -> None:
    prototype = hasattr(model, "prototypes") and hasattr(model, "embed")
    if loss not in LOSS_SETTINGS:
        raise UserError(f"unknown loss setting {loss!r}: choose one of {', '.join(LOSS_SETTINGS)}")
    if loss in CODE_RULES and not prototype:
        raise UserError(f"loss setting {loss!r} (and its rule {CODE_RULES[loss]}) needs a prototype model; this model"
                        " has a linear head: use loss setting 'ce'")
    if loss == "ce" and prototype:
        raise UserError("loss setting 'ce' is for models with a linear head; a prototype model is attacked by the code"
                        " with 'inf' or 'mean'")
    if (protocol.eps_space == "normalised" or protocol.clamp_space == "normalised" or protocol.mismatch) and mean is None:
        raise UserError(f"{protocol.name} works in normalised units and needs the data set's mean and std; this data"
                        " set has none")
    if protocol.transfer and surrogate is None:
        raise UserError(f"{protocol.name} crafts its examples on a cross-entropy model: give one (surrogate=, or"
                        " --surrogate RUN)")


def run_protocol(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, protocol: str | Protocol, loss: str,
                 mean=None, std=None, eps: float = 8 / 255, off=(), surrogate: nn.Module | None = None,
                 seed: int = 0, device=None) -> dict:
    """Accuracy of ``model`` under one of the code's paths, with the quirks named in ``off`` switched off.

    Args:
        model: a trained classifier (``PrototypeClassifier`` or a linear-head ``Network``).
        x: clean images [N, C, H, W] in [0, 1]; y: labels [N].
        protocol: a name of ``PROTOCOLS`` (the ``diagnostic:`` prefix may be left out) or a ``Protocol``.
        loss: the code's loss setting the attack maximises (``inf``, ``mean``; ``ce`` for a linear head).
        mean, std: the data set's per-channel statistics (needed by path B's normalised units).
        eps: the L-inf radius as the code wrote it (8/255), in the units of the path's ``eps_space``.
        off: quirks (``QUIRKS``) of the path to set to their sound values.
        surrogate: the cross-entropy model the transfer path crafts its examples on.
        seed: seed of the random starts.

    Returns:
        A dict: ``protocol`` (with the ``diagnostic:`` prefix), ``loss``, ``off``, ``switches`` (every
        switch as it ran), ``n``, ``clean_accuracy`` (the model's own rule on the clean pixels),
        ``accuracy_as_fed`` (the path's view and scoring on the image as the path feeds it, before
        any clamp), ``accuracy_at_start`` (after the path's clamp, before any step), ``accuracy``
        (after the attack, scored as the path scores), ``accuracy_pooled`` (the same over all
        points, not per batch), ``seconds``.
    """
    base = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
    p = base.without(off)
    mean_t = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    std_t = None if std is None else torch.as_tensor(std, dtype=torch.float32)
    _check(model, p, loss, mean_t, surrogate)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if mean_t is None:
        mean_t, std_t = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    normalised = p.clamp_space == "normalised"
    rule = CODE_RULES.get(loss) if p.code_rule else None
    started = time.time()
    target = View(model, mean_t, std_t, normalised=normalised, mismatch=p.mismatch, rule=rule).to(device)
    attacked = View(model, mean_t, std_t, normalised=normalised, mismatch=p.mismatch, rule=rule, fp16=p.fp16).to(device)
    outcome = {"clean": [], "as_fed": [], "start": [], "final": []}
    with evaluating(model), (evaluating(surrogate) if surrogate is not None else nullcontext()):
        for start in range(0, len(y), p.batch_size):
            xb, yb = x[start : start + p.batch_size].to(device), y[start : start + p.batch_size].to(device)
            batch_seed = derive_seed(seed, p.name, start)
            with torch.no_grad():
                outcome["clean"].append((model(xb).argmax(1) == yb).cpu())
            if p.transfer:
                v_adv, fed, at_start = _transfer_examples(surrogate, xb, yb, p, eps, batch_seed), xb, xb
            else:
                fed = (xb - mean_t.to(device).view(1, -1, 1, 1)) / std_t.to(device).view(1, -1, 1, 1) if normalised else xb
                radius = _radius(p, eps, std_t.to(device), xb)
                centre, half, low, high = code_ball(fed, radius)
                at_start = torch.minimum(torch.maximum(fed, low), high)
                v_adv = pgd(attacked, centre, yb, eps=half, alpha=p.alpha_over_eps * eps, steps=p.steps,
                            loss=_code_loss(loss), random_start=p.random_start, early_stop=False, seed=batch_seed)
            with torch.no_grad():
                for key, v in (("as_fed", fed), ("start", at_start), ("final", v_adv)):
                    outcome[key].append((target(v).argmax(1) == yb).cpu())
    correct = {key: torch.cat(value) for key, value in outcome.items()}
    return {
        "protocol": p.name, "loss": loss, "off": sorted(off), "diagnostic": True,
        "switches": {f.name: getattr(p, f.name) for f in fields(p) if f.name not in ("name", "summary")},
        "n": len(y), "eps": eps, "seed": seed,
        "clean_accuracy": correct["clean"].float().mean().item(),
        "accuracy_as_fed": _accuracy(correct["as_fed"], p.per_batch, p.batch_size),
        "accuracy_at_start": _accuracy(correct["start"], p.per_batch, p.batch_size),
        "accuracy": _accuracy(correct["final"], p.per_batch, p.batch_size),
        "accuracy_pooled": correct["final"].float().mean().item(),
        "correct_indices": correct["final"].nonzero().flatten().tolist(),
        "seconds": round(time.time() - started, 3),
    }


def _radius(p: Protocol, eps: float, std: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The L-inf radius per coordinate in the attack's variable: eps written in ``eps_space`` units,
    measured in ``clamp_space`` units (a standard deviation is ``std`` pixels)."""
    per_channel = torch.full_like(std, eps)
    if p.eps_space == "normalised" and p.clamp_space == "pixel":
        per_channel = eps * std
    elif p.eps_space == "pixel" and p.clamp_space == "normalised":
        per_channel = eps / std
    return per_channel.view(1, -1, 1, 1).expand_as(x)


def _transfer_examples(surrogate: nn.Module, x, y, p: Protocol, eps: float, seed: int) -> torch.Tensor:
    """CE PGD on the cross-entropy source, in pixels; fed raw pixels under ``source_unnormalised``."""
    network = surrogate.network if hasattr(surrogate, "network") else surrogate
    if p.source_unnormalised and not hasattr(network, "body"):
        raise UserError(f"the transfer source {type(surrogate).__name__} is not built as normalisation + body")
    source = network.body if p.source_unnormalised else surrogate
    return pgd(source, x, y, eps=eps, alpha=p.alpha_over_eps * eps, steps=p.steps, loss="ce",
               random_start=p.random_start, early_stop=False, seed=seed)
