"""Clean and robust accuracy of any model: the per-example worst-case cascade of a suite.

A suite is a list of attacks run as a cascade (as AutoAttack does): each attack runs only
on the points that every earlier attack failed on, and a point counts as robust only if
it survives all of them. Evaluation runs in fp32 with the model in eval mode, on the first
N test points, unshuffled, with a seed, and after each attack the cascade's state is saved
so that an interrupted suite resumes at the next attack.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..attacks import (GRADIENT_ATTACKS, attack_survivors, batched, channels_last_weights, correct_every_time,
                       evaluating, geometry, get_attack)
from ..attacks.geometry import check_eps
from ..errors import UserError
from ..runtime import derive_seed, live_progress
from ..store import files as ckpt
from . import probes, sanity
from .suites import TRANSFER, AttackSpec, specs_for


# A randomised model (two forward passes differ) counts a point as correct only if it is
# classified correctly in every one of this many passes, so a lucky pass is no robustness.
RANDOMISED_VOTES = 10


def predict(model, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """The predicted class of every image of ``x`` [N], in batches."""
    predictions = batched(lambda xb: model(xb).argmax(1), x, batch_size=batch_size, device=device)
    return torch.empty(0, dtype=torch.long) if predictions is None else predictions


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, suite: str = "quick",
             eps: float = 8 / 255, norm: str = "linf", batch_size: int = 256, seed: int = 0,
             device: str | torch.device | None = None, quiet: bool = True, state_path: str | Path | None = None,
             checks: bool | None = None, surrogate: torch.nn.Module | None = None, votes: int | None = None,
             channels_last: bool | None = None) -> dict:
    """Clean accuracy and the worst case over a suite of attacks, for any logits model.

    Args:
        model: an ``nn.Module`` mapping images [N, C, H, W] in [0, 1] to class scores [N, k];
            normalisation belongs inside it. Its mode is set to eval for the evaluation and
            restored afterwards; its weights are not changed. A model without an input
            gradient (a non-differentiable step inside) is evaluated too: its gradient
            attacks are recorded as not applicable (wrap the step with ``repulsor.bpda``).
        x: images [N, C, H, W] in [0, 1]; y: labels [N] (int64).
        suite: ``quick``, ``paper``, ``standard``, ``adaptive`` or ``rand`` (see ``SUITES``).
        eps: perturbation size in pixel units (8/255 for L-inf, 0.5 for L2, 12 for L1 on CIFAR-10).
        norm: ``linf``, ``l2`` or ``l1`` (the ``standard`` and ``adaptive`` suites then start with
            AutoAttack's L1 version, ``L1_STANDARD``).
        batch_size: examples per attack call.
        seed: makes every random start and query reproducible (and, for a randomised
            model, its random draws).
        device: where to run; default: the model's device.
        quiet: no progress bar.
        state_path: a safetensors file where the cascade's state is saved after every
            attack, so that an interrupted evaluation resumes at the next attack.
        checks: run the gradient-masking sanity checks (default: for standard, adaptive
            and rand).
        surrogate: a differentiable model over the same classes; when given, a transfer
            attack (``TRANSFER``: APGD-CE on the surrogate) ends the cascade.
        votes: forward passes per accuracy decision; a point counts as correct only if all
            of them classify it correctly. Default: 1 for a deterministic model,
            ``RANDOMISED_VOTES`` for one whose two forward passes differ.
        channels_last: hold the model's convolution filters in channels-last memory order
            while it is evaluated (``channels_last_weights``; the same values, faster passes on
            colour images). Default: on the CPU (where it was measured) for images of more than
            one channel, when the model gives the same scores that way (``probes.runs_channels_last``),
            decided for the model and for a ``surrogate`` each on its own.

    Returns:
        A dict: ``n``, ``clean_accuracy``, ``attacks`` (one entry per attack: name, attack,
        loss, norm, eps, steps, restarts, eot, status ("done" or "not applicable", with a
        ``reason``), n_attacked, accuracy after it, seconds), ``robust_accuracy`` (the worst
        case), ``suite``, ``seed``, ``precision`` ("fp32"), ``memory_format`` ("channels_last" or
        "contiguous", the filters'), ``randomised``, ``votes``, and, with checks, ``sanity`` (a list
        of verdicts).
    """
    specs = specs_for(suite, model, norm)
    _check_arguments(x, y, eps=eps, norm=norm, votes=votes, channels_last=channels_last)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    with ExitStack() as stack:
        # A randomised model draws from the global generator: seed it here, and leave the
        # caller's generator as it was.
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        torch.manual_seed(derive_seed(seed, "model randomness"))
        stack.enter_context(evaluating(model))
        model_layout = _layout(model, x, device, channels_last)
        stack.enter_context(channels_last_weights(model, model_layout))
        if surrogate is not None:
            stack.enter_context(evaluating(surrogate))
            stack.enter_context(channels_last_weights(surrogate, _layout(surrogate, x, device, channels_last)))
        randomised = len(y) > 0 and probes.is_randomised(model, x, device=device, batch_size=batch_size)
        votes = votes or (RANDOMISED_VOTES if randomised else 1)
        gradient = len(y) == 0 or probes.has_input_gradient(model, x, y, device=device)
        if surrogate is not None:
            specs.append(TRANSFER)
        elif not gradient:
            specs.append(TRANSFER)  # recorded as not applicable: it says what would measure the model
        robust = batched(lambda xb, yb: correct_every_time(model, xb, yb, votes), x, y, batch_size=batch_size,
                         device=device) if len(y) else torch.zeros(0, dtype=torch.bool)
        clean_accuracy = robust.sum().item() / len(y) if len(y) else 0.0
        clean = robust.clone()
        x_worst = x.clone().cpu()
        key = _state_key(suite, len(x), eps, norm, seed, transfer=surrogate is not None)
        robust, x_worst, entries = _restore(state_path, key, robust, x_worst)
        done = len(entries)
        cascade = Cascade(model, x, y, x_worst, robust, eps=eps, norm=norm, batch_size=batch_size, device=device,
                          quiet=quiet, votes=votes, surrogate=surrogate)
        for index, spec in enumerate(specs):
            if index < done:
                continue
            reason = _not_applicable(spec, gradient, surrogate)
            entries.append(cascade.skip(spec, reason) if reason else cascade.run(spec, derive_seed(seed, spec.name)))
            if state_path is not None:
                ckpt.save_tensors(state_path, {"robust": robust.to(torch.uint8), "x_worst": x_worst},
                                  {"key": key, "entries": entries})
        result = {
            "suite": suite, "n": len(y), "norm": norm, "eps": eps, "seed": seed, "precision": "fp32",
            "memory_format": "channels_last" if model_layout else "contiguous",
            "randomised": bool(randomised), "votes": votes,
            "clean_accuracy": clean_accuracy, "attacks": entries,
            "robust_accuracy": robust.sum().item() / len(y) if len(y) else 0.0,
            # the points themselves, so that two evaluations of the same points compare point by point
            "clean_indices": clean.nonzero().flatten().tolist(), "robust_indices": robust.nonzero().flatten().tolist(),
        }
        if checks if checks is not None else suite in ("standard", "adaptive", "rand"):
            result["sanity"] = sanity.run_checks(model, x, y, entries, eps=eps, norm=norm, seed=seed,
                                                 device=device, batch_size=batch_size, quiet=quiet, votes=votes)
    result["x_adv"] = x_worst  # popped by callers that write files; handy for analyses
    return result


def _layout(model: torch.nn.Module, x: torch.Tensor, device: torch.device, channels_last: bool | None) -> bool:
    """Whether ``model``'s filters are held channels-last while it is evaluated: as asked, or by
    default on the CPU for colour images when the model gives the same scores that way. Decided
    for each model that the evaluation runs (the model, and a surrogate on its own)."""
    if channels_last is not None:
        return channels_last
    return device.type == "cpu" and x.shape[1] > 1 and len(x) > 0 and probes.runs_channels_last(model, x, device=device)


def _check_arguments(x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, votes, channels_last) -> None:
    """Refuse, in one line each, an unknown norm, an eps that is no radius of that norm (``check_eps``),
    images and labels that do not pair up, a number of votes that is not a whole number >= 1 and a
    ``channels_last`` that is neither True, False nor None."""
    if x.dim() != 4 or len(x) != len(y):
        raise UserError(f"expected images [N, C, H, W] and labels [N]; got {tuple(x.shape)} and {tuple(y.shape)}")
    check_eps(eps, norm, x[0].numel())
    if votes is not None and (isinstance(votes, bool) or not isinstance(votes, int) or votes < 1):
        raise UserError(f"votes must be a whole number >= 1; got {votes!r}")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise UserError(f"channels_last must be True, False or None (None: for images of more than one channel);"
                        f" got {channels_last!r}")


def _restore(state_path, key: str, robust: torch.Tensor, x_worst: torch.Tensor):
    """The cascade's state saved under ``key`` in ``state_path`` (``robust``, ``x_worst`` and the
    entries of the attacks already run), or the given fresh state with no entries."""
    if state_path is not None and Path(state_path).exists():
        tensors, meta = ckpt.load_tensors(state_path, "evaluation state")
        if meta.get("key") == key:
            return tensors["robust"].bool(), tensors["x_worst"], meta["entries"]
    return robust, x_worst, []


def _state_key(suite: str, n: int, eps: float, norm: str, seed: int, *, transfer: bool = False) -> str:
    return f"{suite}|{n}|{eps!r}|{norm}|{seed}" + ("|transfer" if transfer else "")


def _not_applicable(spec: AttackSpec, gradient: bool, surrogate) -> str:
    """Why ``spec`` cannot run on this model ("" when it can)."""
    if spec.attack == "transfer":
        return "" if surrogate is not None else "no surrogate model given (evaluate(..., surrogate=) or --surrogate RUN)"
    if spec.attack in GRADIENT_ATTACKS and not gradient:
        return "no input gradient"
    return ""


@dataclass
class Cascade:
    """The cascade's state: the points still ``robust`` [N] and each point's worst case
    ``x_worst`` (CPU), updated in place by every attack on the points still robust."""

    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    x_worst: torch.Tensor
    robust: torch.Tensor
    eps: float
    norm: str
    batch_size: int
    device: torch.device
    quiet: bool
    votes: int = 1
    surrogate: torch.nn.Module | None = None

    def _entry(self, spec: AttackSpec, kwargs: dict, n_attacked: int, seconds: float) -> dict:
        n = len(self.y)
        return {
            "name": spec.name, "attack": spec.attack, "loss": kwargs.get("loss", ""), "norm": self.norm,
            "eps": self.eps, "steps": spec.steps, "restarts": spec.restarts, "eot": spec.settings.get("eot", 1),
            "n": n, "n_attacked": n_attacked, "accuracy": self.robust.sum().item() / n if n else 0.0,
            "seconds": round(seconds, 3), "status": "done",
        }

    def skip(self, spec: AttackSpec, reason: str) -> dict:
        """The entry of an attack that cannot run on this model: nothing attacked, accuracy unchanged."""
        return dict(self._entry(spec, spec.kwargs(self.eps, self.norm), 0, 0.0), status="not applicable",
                    reason=reason)

    def run(self, spec: AttackSpec, seed: int) -> dict:
        """Run one attack on the points still robust; update ``robust`` and ``x_worst`` in place."""
        attack = get_attack(spec.attack)
        kwargs = spec.kwargs(self.eps, self.norm)
        if spec.attack == "transfer":
            kwargs.update(surrogate=self.surrogate, via=get_attack(kwargs["via"]))
        geom = geometry(self.norm)
        started = time.time()

        def checked_attack(xb, yb, start):
            x_adv = attack(self.model, xb, yb, seed=derive_seed(seed, start), **kwargs)
            # A bug in an attack must never inflate or deflate a result: check the threat model.
            # (in float64, with float32's rounding of x + d - x allowed for: an L1 norm sums D of them)
            excess = (geom.norm((x_adv - xb).double()) - self.eps).max().item() if len(xb) else 0.0
            if excess > 1e-5 * max(1.0, self.eps) or x_adv.min() < 0 or x_adv.max() > 1:
                raise RuntimeError(f"{spec.name} left the threat model (norm excess {excess:g}); this is a repulsor bug")
            return x_adv

        total = int(self.robust.sum())
        live = not self.quiet and live_progress()
        with tqdm(total=total, desc=spec.name, unit="pt", disable=not live, leave=False, dynamic_ncols=True) as bar:
            attacked = attack_survivors(self.model, checked_attack, self.x, self.y, self.robust,
                                        batch_size=self.batch_size, device=self.device, votes=self.votes,
                                        x_worst=self.x_worst, progress=bar.update)
        entry = self._entry(spec, spec.kwargs(self.eps, self.norm), attacked, time.time() - started)
        if not self.quiet and not live:  # in a log: one line per attack instead of a bar's frames
            print(f"  {spec.name}: accuracy after {entry['accuracy']:.4f} ({attacked} attacked, {entry['seconds']:.1f}s)",
                  file=sys.stderr, flush=True)
        return entry
