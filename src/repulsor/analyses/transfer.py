"""The transfer attack of Table 4: adversarial examples crafted on one model, checked on others."""

from __future__ import annotations

import torch

from ..attacks import evaluating
from ..errors import UserError
from ..evaluation.cascade import evaluate, predict
from ..evaluation.suites import SUITES


def _accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (eval mode, no gradients)."""
    with evaluating(model):
        predictions = predict(model, x, batch_size, device)
    return (predictions == y.cpu()).sum().item() / len(y) if len(y) else 0.0


def transfer_accuracy(source_model: torch.nn.Module, target_models: dict, x: torch.Tensor, y: torch.Tensor, *,
                      eps: float, norm: str = "linf", seed: int = 0, batch_size: int = 256, device=None,
                      x_adv: torch.Tensor | None = None, quiet: bool = True) -> dict:
    """Accuracy of target models on adversarial examples crafted on a source model (Table 4).

    The examples are those of the ``quick`` suite run on the source model: PGD-20, step
    eps/4, uniform random start, cross-entropy on the class scores, seeded. As in the
    suite's cascade, a point keeps the first iterate that fools the source (and stays
    clean if none does), so the source's accuracy on them is exactly its white-box
    ``quick`` robust accuracy under the same ``eps``, ``norm``, ``seed`` and batch size.

    Args:
        source_model: the substitute model; maps images [N, C, H, W] in [0, 1] to scores [N, k].
        target_models: ``{name: model}``, the models under attack (black box: only their
            predictions are used). The source may be among them.
        x: clean images [N, C, H, W] in [0, 1]; y: labels [N] (int64).
        eps: perturbation size in pixel units; norm: ``linf`` or ``l2``.
        seed: seed of the attack's random starts.
        batch_size: examples per attack call and per prediction batch.
        device: where to run; default: the source model's device.
        x_adv: adversarial examples crafted earlier with these settings (skips the attack).
        quiet: no progress bar.

    Returns:
        ``source_accuracy`` (the source on its own examples), ``attack`` (the attack's
        settings), ``n``, ``targets``: ``{name: {"clean_accuracy", "accuracy"}}``
        (accuracy on the transferred examples), and ``x_adv`` (the examples, CPU).
    """
    device = torch.device(device) if device is not None else next(source_model.parameters()).device
    spec = SUITES["quick"][0]
    attack = {"name": spec.name, "steps": spec.steps, "loss": spec.loss, "alpha": spec.settings["alpha_over_eps"] * eps,
              "eps": eps, "norm": norm, "seed": seed, "restarts": spec.restarts, "random_start": True}
    if x_adv is None:
        result = evaluate(source_model, x, y, suite="quick", eps=eps, norm=norm, batch_size=batch_size,
                                       seed=seed, device=device, quiet=quiet, checks=False)
        x_adv = result["x_adv"]
    if x_adv.shape != x.shape:
        raise UserError(f"x_adv has shape {tuple(x_adv.shape)}, the clean images {tuple(x.shape)}")
    targets = {}
    for name, model in target_models.items():
        targets[name] = {"clean_accuracy": _accuracy(model, x, y, batch_size, device),
                         "accuracy": _accuracy(model, x_adv, y, batch_size, device)}
    return {"source_accuracy": _accuracy(source_model, x_adv, y, batch_size, device), "attack": attack,
            "n": len(y), "targets": targets, "x_adv": x_adv}
